"""Ray settings of the test session's training runs.

Ray Train's controller takes at most one report (a log point, a checkpoint) from each
worker per poll, and a worker's next report waits until it has: at the default 2 s poll
interval the tiny CPU runs of the tests spent most of their time waiting, about 2 s per
log point (~60 s of a 300-step run logged every 10 steps). Polling every 0.5 s trains
the same steps and writes the same reports and checkpoints in a quarter of that.
"""
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
