"""Alembic migrations of the store's schema, run by ``Store.migrate`` when the service starts.

Every revision must be additive (new tables, nullable or defaulted columns, indexes) so that
replicas of the previous release keep working while a new one starts and migrates the shared
database. Write the next revision with
``alembic -c src/lbp_cds/migrations/alembic.ini revision --rev-id 0004 -m "..."``, fill in its
``upgrade`` and ``downgrade``, and set ``store.SCHEMA_REVISION`` to it;
``tests/test_migrations.py`` fails while the tables in ``store.py``, the revisions and that
constant disagree.
"""
