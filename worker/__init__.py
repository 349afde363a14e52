"""The worker: a Celery app whose process owns one model pipeline.

pipeline/  load a model and run its forward passes on a device (torch CPU/CUDA, IPU)
engine/    continuous batching over the pipeline: slots, sampling, context fitting, detokenizing
celery glue: app.py (config object, queues), steps.py (load at start, detach at stop),
             tasks.py (the thin `generate` task), turns.py (one turn: engine -> stream -> commit)
"""
