"""A run's life around the training loop: launching it (launch.py: skip, resume, fail, always a
result row), its directory's lock (lock.py), its record (record.py), the Hydra callbacks
(callbacks.py) and sharing a machine between parallel jobs (sharing.py)."""
