"""The Ray run: the driver (``pipeline``), the flow of batches (``scheduler``) and the policy for
failures (``failures``), model actors, scene writers, worker tasks, the local Ray started for a
laptop, and the lock on an output folder. The only layer that knows Ray, with ``train.fit``."""
