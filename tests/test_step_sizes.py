"""`StepSizes` against the nested tuples it replaces: every read the scheduler makes gives what the
tuples give, on random shapes with empty steps and across the iteration chunks."""

import pickle
import random

import numpy as np
import pytest

import mlora_pp.step_sizes as step_sizes
from mlora_pp.schedule import JobSteps
from mlora_pp.step_sizes import StepSizes


def random_steps(rng: random.Random) -> tuple:
    return tuple(tuple((rng.randint(1, 4), rng.randint(1, 900)) for _ in range(rng.choice([0, 1, 1, 2, 3, 5])))
                 for _ in range(rng.randint(0, 12)))


def test_reads_give_what_the_nested_tuples_give(monkeypatch):
    monkeypatch.setattr(step_sizes, "CHUNK", 3)  # iteration crosses chunk boundaries
    rng = random.Random(3)
    for _ in range(300):
        steps = random_steps(rng)
        sizes = StepSizes.of(steps)
        assert len(sizes) == len(steps) and tuple(sizes) == steps and sizes == steps
        assert sizes.micro_count == sum(len(m) for m in steps)
        assert sizes.counts.tolist() == [len(m) for m in steps]
        for k in range(-len(steps), len(steps)):
            assert sizes[k] == steps[k]
            assert sizes.micros_in(k % len(steps)) == len(steps[k])
            assert sizes.start(k % len(steps)) == sum(len(m) for m in steps[: k % len(steps)])
        for a in range(-2, len(steps) + 2):
            for b in (None, a + 1, a + 3, -1):
                assert isinstance(sizes[a:b], StepSizes) and sizes[a:b] == steps[a:b], (a, b)
        assert sizes[::2] == steps[::2]
        for count in range(sizes.micro_count + 1):  # the step the cut falls in, trimmed, and all after
            before = 0
            for k, micros in enumerate(steps):
                if before + len(micros) > count:
                    want = (micros[count - before :],) + steps[k + 1 :]
                    break
                before += len(micros)
            else:
                want = ()
            assert sizes.without_first(count) == want, count
        for wrong in (-1, sizes.micro_count + 1):
            with pytest.raises(ValueError, match="cannot drop"):
                sizes.without_first(wrong)


def test_equality_hash_and_pickle():
    steps = (((2, 10), (1, 4)), (), ((3, 30),))
    sizes = StepSizes.of(steps)
    same = StepSizes(np.array([2, 1, 3]), np.array([10, 4, 30]), np.array([2, 2, 3]))
    assert sizes == same and hash(sizes) == hash(same)
    assert sizes == [list(m) for m in steps]
    assert sizes != steps[:2] and sizes != (((2, 10), (1, 5)), (), ((3, 30),)) and sizes != StepSizes.of(steps[1:])
    assert pickle.loads(pickle.dumps(sizes)) == sizes
    assert StepSizes.of(sizes) is sizes and StepSizes.of(()) == () and len(StepSizes.of(())) == 0


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="shapes"):
        StepSizes(np.array([1, 2]), np.array([1]), np.array([2]))
    with pytest.raises(ValueError, match="finish"):
        StepSizes(np.array([1, 2]), np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="decrease"):
        StepSizes(np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([2, 1, 3]))
    with pytest.raises(IndexError):
        StepSizes.of((((1, 1),),))[1]
    with pytest.raises(TypeError):
        StepSizes.of((((1, 1),),))["0"]


def test_job_steps_keep_their_sizes_as_arrays_and_compare_to_tuples():
    steps = (((2, 10), (1, 4)), ((3, 30),))
    job = JobSteps("j", steps, first_step=4)
    assert isinstance(job.micro_batches, StepSizes)
    assert job == JobSteps("j", StepSizes.of(steps), first_step=4) and job.micro_batches == steps
    assert job.tokens == 44 and job.steps == 2
    assert len({job, JobSteps("j", steps, first_step=4)}) == 1
