"""Tests of the database backend (DatabaseSessionCache, shm+postgresql://)."""
