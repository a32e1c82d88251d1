"""The write plan: computed from shapes alone, followed exactly by the prefetcher, and cut into
torch_dist parts only when there are more workers than ranks."""

from __future__ import annotations

import json
from contextlib import closing

import pytest
import torch

from ckptbridge.errors import PlanError
from ckptbridge.layout import ParallelLayout
from ckptbridge.output import plan_output
from ckptbridge.prefetch import Prefetcher
from ckptbridge.spec import ModelSpec
from ckptbridge.workshare import assign


def _keys(mcore) -> list[str]:  # noqa: ANN001
    from ckptbridge.formats.torch_dist import read_metadata

    return list(read_metadata(mcore / "release").state_dict_metadata)


def _spec(folder) -> ModelSpec:  # noqa: ANN001
    return ModelSpec.from_hf_config(json.loads((folder / "config.json").read_text()))


def _plan(spec: ModelSpec, fmt: str, layout: ParallelLayout, workers: int = 1):  # noqa: ANN202
    margs = spec.megatron_args(layout, torch.float32, "te", fmt, 128, False)
    return plan_output(spec, spec.planned(), fmt, torch.float32, layout, margs, "te", None, 0, None, workers)


def test_prefetcher_refuses_reads_off_the_plan(tiny_hf):
    planned = _spec(tiny_hf["llama3.2-1b"]).planned()
    with closing(Prefetcher(planned[:3], lambda pt: torch.zeros(1))) as read:
        read(planned[0])
        with pytest.raises(PlanError, match="where the write plan reads"):
            read(planned[2])


def test_legacy_reads_a_tied_replica_again_on_its_stage(tiny_hf):
    """qwen2.5-0.5b ties its embedding: at PP 2 the last stage holds a replica, written (and read) there."""
    spec = _spec(tiny_hf["qwen2.5-0.5b"])
    plan = _plan(spec, "torch", ParallelLayout(tp=2, pp=2))
    reads = [pt.mcore_name for pt in plan.reads(None, ())]
    embedding = reads[0]
    assert reads.count(embedding) == 2 and len(reads) == len(spec.planned()) + 1
    last = [f for f in plan.files.sizes if "_001/" in f]
    assert [pt.mcore_name for pt in plan.reads(frozenset(last), ())].count(embedding) == 1


@pytest.mark.parametrize("layout", [dict(tp=1), dict(tp=2, pp=2)])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_torch_dist_parts(tiny_hf, layout, workers):
    spec = _spec(tiny_hf["llama3.2-1b"])
    lay = ParallelLayout(**layout)
    one, plan = _plan(spec, "torch_dist", lay), _plan(spec, "torch_dist", lay, workers)
    ranks = lay.tp * lay.pp
    assert sorted(one.files.sizes) == sorted(f"__{r}_0.distcp" for r in range(ranks))
    if workers <= ranks:  # the one-process files, whoever writes them
        assert plan.files == one.files and plan.steps == one.steps
        return
    assert len(plan.files.sizes) >= workers and sum(plan.files.sizes.values()) == sum(one.files.sizes.values())
    assert all(plan.files.sizes.values())  # no empty part
    for step, same in zip(plan.steps, one.steps):  # the same chunks, only in other files
        assert [(i.index, i.shape) for i in step.where[1]] == [(i.index, i.shape) for i in same.where[1]]
    shares = assign(plan.files.sizes, workers)
    assert all(shares) and set().union(*(plan.files.tensors_for(s) for s in shares)) == {pt.mcore_name for pt in spec.planned()}


def _count_plans(monkeypatch) -> list[str]:  # noqa: ANN001
    calls: list[str] = []
    planned = ModelSpec.planned

    def counted(spec: ModelSpec):  # noqa: ANN202
        calls.append(spec.mapping.family)
        return planned(spec)

    monkeypatch.setattr(ModelSpec, "planned", counted)
    return calls


def test_a_conversion_plans_its_tensors_once(tiny_hf, tmp_path, monkeypatch):
    """The source plans the tensor list when it is opened; its checks, the FP8 export, the write plan
    and the readers all take that one list (each pass walks every tensor of the model)."""
    from ckptbridge.convert import Target, convert

    calls = _count_plans(monkeypatch)
    src = tiny_hf["llama3.2-1b"]
    for name, source, target in [
        ("dist", src, Target("mcore", ParallelLayout(tp=2), "torch_dist")),
        ("legacy", src, Target("mcore", ParallelLayout(tp=2, pp=2), "torch")),
        ("fp8", tmp_path / "dist", Target("hf", hf_fp8=True)),
        ("hf", tmp_path / "legacy", Target("hf")),
    ]:
        calls.clear()
        convert(source, tmp_path / name, None, target)
        assert len(calls) == 1, (name, calls)


def test_optional_mtp_plans_once(tiny_moe, tmp_path, monkeypatch):
    """A folder that declares MTP blocks it lacks (transformers' save_pretrained) is planned once too:
    whether to drop them is decided from the MTP blocks alone."""
    from ckptbridge.convert import Target, convert

    from helpers import add_mtp_blocks

    with_mtp = add_mtp_blocks(tiny_moe["deepseek-v3"], tmp_path / "mtp")
    calls = _count_plans(monkeypatch)
    for name, src in [("without", tiny_moe["deepseek-v3"]), ("with", with_mtp)]:
        calls.clear()
        convert(src, tmp_path / name, None, Target("mcore", ParallelLayout(), "torch_dist"))
        assert len(calls) == 1, (name, calls)
        assert any(k.startswith("mtp.") for k in _keys(tmp_path / name)) == (name == "with")


def test_plans_place_every_tensor_byte(tiny_hf, tmp_path):
    """HF and torch_dist plans say where each tensor's bytes go (``Step.at``, torch_dist items): the
    written files hold them exactly there."""
    from ckptbridge.convert import Target, convert
    from ckptbridge.formats.safetensors_io import SafetensorsFile
    from ckptbridge.formats.torch_dist import read_metadata
    from ckptbridge.formats.torch_dist_writer import planned_storage

    src = tiny_hf["qwen2.5-0.5b"]
    spec, layout = _spec(src), ParallelLayout(tp=2, pp=2)
    convert(src, tmp_path / "mc", None, Target("mcore", layout, "torch_dist"))
    plan = _plan(spec, "torch_dist", layout)
    assert read_metadata(tmp_path / "mc" / "release").storage_data == planned_storage(plan)
    assert all(r.length for s in plan.steps for r in s.at)
    convert(tmp_path / "mc", tmp_path / "hf", None, Target("hf", max_shard_bytes=200_000))
    plan = plan_output(spec, spec.planned(), "hf", torch.float32, ParallelLayout(), None, "te", None, 200_000, None)
    assert len(plan.files.sizes) > 1
    files = {name: SafetensorsFile(tmp_path / "hf" / name) for name in plan.files.sizes}
    try:
        for step in plan.steps:
            shard, entries = step.where
            assert [(shard, files[shard].entries[n].start, files[shard].entries[n].nbytes) for n, _, _ in entries] \
                == [tuple(r) for r in step.at]
    finally:
        for f in files.values():
            f.close()
