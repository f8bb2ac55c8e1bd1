"""Meshes and rule sets: 8 simulated devices compute what one device computes; golden partition specs;
checkpoints restore onto another mesh unchanged; clear errors for impossible meshes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import sharding
from gptjax.checkpoint import Checkpoints
from gptjax.config import ConfigError, MeshConfig
from gptjax.train import steps as train_steps

MESHES = {
    "dp": MeshConfig(data=8, fsdp=1, tensor=1, rules="dp"),
    "fsdp": MeshConfig(data=1, fsdp=8, tensor=1, rules="fsdp"),
    "fsdp_tp": MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp"),
}
STEPS = 3


def spec_tree(state_shardings):
    return jax.tree.map(lambda s: s.spec, state_shardings)


@pytest.fixture(scope="module")
def trainers8(train_cfg):
    """One trainer per rule set on all 8 devices, compiled on first use."""
    cache = {}

    def get(rules):
        if rules not in cache:
            mcfg = MESHES[rules]
            cfg = dataclasses.replace(train_cfg, mesh=mcfg)
            cache[rules] = train_steps.make_train_steps(cfg, sharding.make_mesh(mcfg))
        return cache[rules]

    return get


def run_steps(trainer, token_data, state, start, n):
    losses = []
    for step in range(start, start + n):
        raw = token_data.batch(0, step, 8, 32)[None]
        state, metrics = trainer.step(state, jax.device_put(raw, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def reference(trainer1, token_data):
    """Losses and parameters of STEPS steps on one device."""
    init = trainer1.init(jax.random.key(0))
    init_params = jax.device_get(init["params"])
    state, losses = run_steps(trainer1, token_data, init, 0, STEPS)
    return {"init": init_params, "losses": losses, "params": jax.device_get(state["params"])}


@pytest.mark.parametrize("rules", list(MESHES))
def test_eight_devices_match_one_device(rules, trainers8, reference, token_data):
    trainer = trainers8(rules)
    assert trainer.mesh.devices.size == 8
    state = trainer.init(jax.random.key(0))
    # initialised straight into shards, to the same values
    for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(reference["init"])):
        np.testing.assert_array_equal(a, b)
    state, losses = run_steps(trainer, token_data, state, 0, STEPS)
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the state really is laid out as the rule set says
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def test_golden_partition_specs_fsdp_tp(trainers8):
    specs = spec_tree(trainers8("fsdp_tp").state_shardings["params"])
    h = specs["h"]
    assert h["mlp"]["c_fc"]["kernel"] == P(None, "fsdp", "tensor")  # column-parallel
    assert h["mlp"]["c_fc"]["bias"] == P(None, "tensor")
    assert h["mlp"]["c_proj"]["kernel"] == P(None, "tensor", "fsdp")  # row-parallel
    assert h["mlp"]["c_proj"]["bias"] == P(None, "fsdp")
    assert h["attn"]["c_attn"]["kernel"] == P(None, "fsdp", None, "tensor")  # [L, D, 3, N, H]: heads split
    assert h["attn"]["c_attn"]["bias"] == P(None, None, "tensor")
    assert h["attn"]["c_proj"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert h["ln_1"]["scale"] == P(None, "fsdp")
    assert specs["wte"]["embedding"] == P("tensor", "fsdp")
    assert specs["wpe"]["embedding"] == P(None, "fsdp")
    assert specs["ln_f"]["scale"] == P("fsdp")
    # Adam's moments follow their parameters; the step counter is replicated
    opt = trainers8("fsdp_tp").state_shardings["opt_state"]
    mus = [s.spec for s in jax.tree.leaves(opt) if s.spec == P(None, "fsdp", "tensor")]
    assert len(mus) == 2  # mu and nu of c_fc.kernel
    assert trainers8("fsdp_tp").state_shardings["step"].spec == P()
    # a [micro, batch, T+1] token batch is split on its batch axis only
    assert trainers8("fsdp_tp").batch_sharding.spec == P(None, "fsdp")


def test_golden_partition_specs_dp_and_fsdp(trainers8):
    dp = spec_tree(trainers8("dp").state_shardings["params"])
    assert all(s == P() for s in jax.tree.leaves(dp))  # replicated
    assert trainers8("dp").batch_sharding.spec == P(None, "data")
    fsdp = spec_tree(trainers8("fsdp").state_shardings["params"])
    assert fsdp["h"]["mlp"]["c_fc"]["kernel"] == P(None, "fsdp")
    assert fsdp["h"]["attn"]["c_proj"]["kernel"] == P(None, None, None, "fsdp")
    assert fsdp["wte"]["embedding"] == P(None, "fsdp")


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    # a mesh axis is used once, by the first dimension that asks for it
    assert sharding.logical_to_spec(("batch", "seq", "embed"), "fsdp", mesh) == P(("data", "fsdp"))
    assert sharding.logical_to_spec(("vocab", "embed"), {"vocab": "fsdp", "embed": "fsdp"}, mesh) == P("fsdp")
    # an axis that does not divide the dimension is dropped: that dimension stays replicated
    assert sharding.logical_to_spec(("embed",), "fsdp", mesh, shape=(6,)) == P()
    assert sharding.logical_to_spec(("batch",), "fsdp", mesh, shape=(4,)) == P("data")
    assert sharding.logical_to_spec(("batch",), "fsdp", mesh, shape=(8,)) == P(("data", "fsdp"))
    # size-1 axes never appear
    assert sharding.logical_to_spec(("heads",), "fsdp_tp", mesh) == P()


def test_constrain_is_a_no_op_outside_a_mesh():
    x = np.arange(8.0)
    assert sharding.constrain(x, ("batch",)) is x


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == (1, 8, 1)
    assert tuple(sharding.make_mesh(MeshConfig(data=2, tensor=2)).shape.values()) == (2, 2, 2)
    one = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert tuple(one.shape.values()) == (1, 1, 1)
    with pytest.raises(ConfigError, match=r"data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are present.*-1"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match="8 devices cannot be split"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=-1))
    with pytest.raises(ConfigError, match="at most one"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ConfigError, match="positive"):
        sharding.make_mesh(MeshConfig(data=0, fsdp=-1))


def test_checkpoint_restores_onto_another_mesh(trainers8, trainer1, token_data, tmp_path):
    """Save from fsdp_tp on 8 devices; restore onto 1 device and onto fsdp=8: same values, target layout,
    and training continues with the same loss."""
    src = trainers8("fsdp_tp")
    state, _ = run_steps(src, token_data, src.init(jax.random.key(0)), 0, 2)
    saved = jax.device_get(state)
    ckpts = Checkpoints(tmp_path, keep=2, log=lambda _: None)
    assert ckpts.save(2, state, {"note": "test"}, force=True)
    ckpts.wait()
    _, cont = run_steps(src, token_data, state, 2, 1)

    for target in (trainer1, trainers8("fsdp")):
        reader = Checkpoints(tmp_path, read_only=True, log=lambda _: None)
        step, restored = reader.restore(target.abstract_state())
        assert step == 2 and int(restored["step"]) == 2
        for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target.state_shardings)):
            assert x.sharding.is_equivalent_to(s, x.ndim)
        _, losses = run_steps(target, token_data, restored, 2, 1)
        np.testing.assert_allclose(losses, cont, rtol=1e-5)
        _, params_only = reader.restore(target.abstract_state(), 2, params_only=True)
        assert set(params_only) == {"params"}
        assert reader.config(2) == {"note": "test"}
        reader.close()
    ckpts.close()
