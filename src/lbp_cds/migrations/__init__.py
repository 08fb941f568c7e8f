"""Alembic migrations of the store's schema, run by ``Store.migrate`` when the service starts.

Every revision must be additive (new tables, columns with defaults, indexes) so that replicas of
the previous release keep working while a new one starts and migrates the shared database.
Write a new revision with ``alembic -c src/lbp_cds/migrations/alembic.ini revision -m "..."``;
``tests/test_migrations.py`` fails while the tables in ``store.py`` and the revisions disagree.
"""
