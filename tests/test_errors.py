"""The one bad-input error type survives a process boundary (benchmarks and collection run jobs in worker
processes; an InputError raised there must reach the parent with its fields, not as an unpickling crash)."""

import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

from rooflab.errors import InputError


def _raise() -> None:
    raise InputError("campaign.yaml", "models[0].tp", "expected a positive integer")


def test_input_error_pickles_with_its_fields():
    e = pickle.loads(pickle.dumps(InputError("f.yaml", "a.b", "bad")))
    assert (e.source, e.field, e.problem, str(e)) == ("f.yaml", "a.b", "bad", "f.yaml: a.b: bad")


def test_input_error_from_a_worker_process_reaches_the_parent():
    with ProcessPoolExecutor(max_workers=1) as ex, pytest.raises(InputError, match=r"campaign.yaml: models\[0\].tp"):
        ex.submit(_raise).result()
