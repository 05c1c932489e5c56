"""SQLAlchemy result backend for kernel: ``db+postgresql://``, ``db+mysql://``,
``db+sqlite:///`` URLs, on Celery's ``celery_taskmeta``/``celery_tasksetmeta`` tables.

See ``docs/sql.md``. The backend class is ``kernel_sql.backend.SQLBackend``.
"""
