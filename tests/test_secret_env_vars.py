"""runtime_env.env_vars are secrets: masked wherever Prefect stores or shows the run's
parameters (and in the saved teardown state), in clear only in the job submission; a value
'secret-block:NAME' is read from that Prefect Secret block at submission."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from flows.ray_cluster import ray_cluster
from tasks.settings import SECRET_MASK, RayClusterSettings, RuntimeEnvOptions

SECRET = "wandb-1234567890abcdef"


def test_the_runs_parameters_hold_the_value_masked():
    settings = RayClusterSettings.model_validate({"runtime_env": {"env_vars": {"WANDB_API_KEY": SECRET}}})
    stored = json.dumps(ray_cluster.serialize_parameters(settings.parameters()))  # what the server gets
    assert SECRET not in stored and SECRET_MASK in stored
    assert SECRET not in json.dumps(settings.model_dump(mode="json"))  # the saved teardown state
    assert SECRET not in repr(settings) and SECRET not in json.dumps(settings.flat())
    assert settings.runtime_env.as_ray() == {"env_vars": {"WANDB_API_KEY": SECRET}}  # the submission


def test_a_secret_block_is_named_and_read_at_submission():
    env = RuntimeEnvOptions(env_vars={"TOKEN": "secret-block:wandb-key", "PLAIN": "x"})
    assert env.secret_blocks() == {"TOKEN": "wandb-key"}
    assert env.as_ray({"TOKEN": SECRET})["env_vars"] == {"TOKEN": SECRET, "PLAIN": "x"}
    with pytest.raises(ValidationError, match="not a Secret block name"):
        RuntimeEnvOptions(env_vars={"TOKEN": "secret-block:Bad Name"})


def test_a_value_that_arrived_masked_is_refused_at_submission_with_the_way_out():
    env = RuntimeEnvOptions(env_vars={"TOKEN": SECRET_MASK})  # valid: a hook rebuilds saved state so
    with pytest.raises(ValueError, match="secret-block:NAME"):
        env.as_ray()
