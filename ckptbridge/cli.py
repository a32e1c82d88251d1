"""The ``ckptbridge`` command line."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from .dtype_names import ALL as DTYPE_NAMES
from .errors import CkptBridgeError, OptionError
from .extras import needs_extra
from .option_checks import refuse_given
from .quick_exit import leave
from .layout import DEFAULT_VOCAB_DIVISIBLE_BY
from .source_options import source_read_options



class ByteSize(click.ParamType):
    """A size in bytes: an integer, or a number with a unit (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""

    name = "size"
    UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        number = text.rstrip("KMGTIB")
        try:
            size = int(float(number) * self.UNITS[text[len(number):].strip()])
        except (KeyError, ValueError):
            self.fail(f"{value!r}: expected bytes or a size such as 5GB, 500MB, 2GiB", param, ctx)
        if size < 1:
            self.fail(f"{value!r}: must be at least one byte", param, ctx)
        return size


BYTE_SIZE = ByteSize()

#: convert's options that shape an MCore output, and those that shape an HF output (click parameter names)
MCORE_OUTPUT_OPTIONS = ("tp", "pp", "vpp", "pp_first", "pp_last", "ep", "etp", "ckpt_format", "layer_spec",
                        "moe_grouped_gemm", "vocab_divisible_by", "dst_iteration", "check_megatron")
HF_OUTPUT_OPTIONS = ("max_shard_size", "hf_dtype")


def _progress_factory(quiet: bool):
    """A rich progress bar over bytes converted (silent with --quiet or when not on a terminal)."""
    if quiet or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    def factory(total: int, label: str):
        bar = Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task(label, total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)
            if bar.tasks[0].completed >= total:
                bar.stop()

        return advance

    return factory


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptbridge")
@click.option("--mappings", "mapping_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="A folder of your own mapping files (*.yaml), read after the shipped ones and $CKPTBRIDGE_MAPPINGS "
                   "(a file with a shipped family's name replaces it). Repeatable.")
def main(mapping_dirs) -> None:
    """Convert checkpoints between HuggingFace and Megatron-Core, strictly, in one CPU process.

    \b
    Examples:
      ckptbridge convert --src hf --dst mcore --tp 2 --pp 2 ./Llama-3.1-8B ./llama-mcore
      ckptbridge convert --src mcore --dst hf ./llama-mcore ./Llama-3.1-8B-export
      ckptbridge convert --src mcore --dst mcore --tp 1 --pp 4 --format torch ./llama-mcore ./llama-pp4
      ckptbridge inspect ./llama-mcore --json
      ckptbridge --mappings ./my-mappings check-mapping ./my-mappings/phi3.yaml --hf ./Phi-3-mini
    """
    from .mapping_folders import set_user_folders

    set_user_folders(mapping_dirs)  # this invocation's folders only (none: only CKPTBRIDGE_MAPPINGS)
    click.get_current_context().call_on_close(lambda: set_user_folders([]))


@main.command()
@click.option("--src", "src_kind", type=click.Choice(["hf", "mcore"]), required=True, help="Kind of SRC (the MCore format, torch_dist or legacy torch, is detected).")
@click.option("--dst", "dst_kind", type=click.Choice(["hf", "mcore"]), required=True, help="Kind of checkpoint to write.")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel size of the MCore output.")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline-parallel size of the MCore output.")
@click.option("--vpp", type=int, default=None, help="Virtual pipeline chunks per stage (interleaved schedule).")
@click.option("--pp-first", type=int, default=None, help="Layers on the first pipeline stage (uneven split).")
@click.option("--pp-last", type=int, default=None, help="Layers on the last pipeline stage (uneven split).")
@click.option("--ep", type=int, default=1, show_default=True, help="Expert-parallel size (MoE models): routed experts per rank = experts / ep.")
@click.option("--etp", type=int, default=None, help="Expert tensor-parallel size (MoE; default: --tp). Legacy format: 1 or --tp.")
@click.option("--format", "ckpt_format", type=click.Choice(["torch_dist", "torch"]), default="torch_dist", show_default=True,
              help="MCore on-disk format: torch_dist (dist_checkpointing) or legacy per-rank torch files.")
@click.option("--spec", "layer_spec", type=click.Choice(["te", "local"]), default="te", show_default=True,
              help="MCore module names: TransformerEngine spec (what Megatron-LM trains with) or the local spec.")
@click.option("--moe-grouped-gemm", is_flag=True, help="MoE, legacy format: grouped-expert names (experts.linear_fc1.weight<e>) "
              "as TEGroupedMLP saves them, instead of sequential experts (local_experts.<e>.linear_fc1.weight).")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_NAMES)), default=None, help="Cast weights (default: keep the source dtype; "
              "an FP8 source: its config's dtype, else bf16).")
@click.option("--hf-dtype", type=click.Choice(["fp8-block"]), default=None,
              help="HF output: store the linear weights of the layers as e4m3 with fp32 block scales (weight_scale_inv), "
                   "in the model's own FP8 layout or 128x128; the other tensors use --dtype.")
@click.option("--vocab-divisible-by", type=click.IntRange(1), default=DEFAULT_VOCAB_DIVISIBLE_BY, show_default=True, help="Megatron's make_vocab_size_divisible_by (vocab padding).")
@click.option("--dst-iteration", type=click.IntRange(min=0), default=None,
              help="MCore output: write iter_<N:07d>/ with tracker N, as a Megatron-LM run saved at step N (default: release/).")
@click.option("--check-megatron", is_flag=True,
              help="MCore output: before writing, build megatron-core's model of the layout on the meta device and check "
              "every planned name and shape against it (imports megatron-core: a few seconds; see check-mapping).")
@click.option("--max-shard-size", type=BYTE_SIZE, default=None,
              help="HF output: largest safetensors shard, e.g. 5GB, 500MB, 2GiB or bytes (default: the HF source's "
                   "largest shard when it has an index, else 5GB).")
@click.option("--force", is_flag=True, help="Replace DST if it exists (atomically; never a DST holding files the source reaches).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert tensors holding NaN/Inf as they are (default: an error naming the tensor).")
@click.option("--allow-rounding", is_flag=True, help="Let a value-changing mapping step round in the output dtype (the "
              "zero-centred norm offset of a trained Qwen3-Next/Qwen3.5 exported to bf16), with a note of how much "
              "(default: an error naming the tensor; --dtype float32 is exact).")
@click.option("--clean", is_flag=True, help="First remove what interrupted conversions to DST left beside it (.DST.ckptbridge-tmp-*/-old-*).")
@click.option("--fast-copy/--no-fast-copy", default=True, show_default=True,
              help="Copy tensors whose bytes move unchanged inside the kernel (copy_file_range; pread/pwrite where "
                   "refused); --no-fast-copy moves every tensor through memory (the same files, for comparison).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Write with N processes on this machine (torchrun, gloo), each writing whole output files, split by "
                   "bytes; over several nodes run 'torchrun ... -m ckptbridge convert ...' instead.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@source_read_options
def convert(src_kind, dst_kind, tp, pp, vpp, pp_first, pp_last, ep, etp, ckpt_format, layer_spec, moe_grouped_gemm, dtype,
            hf_dtype, vocab_divisible_by, dst_iteration, check_megatron, max_shard_size, force, allow_nonfinite, allow_rounding,
            clean, fast_copy, workers, quiet, src, dst, iteration, config):
    """Convert SRC into DST (HF <-> MCore, or reshard MCore -> MCore).

    Everything is checked before anything is written: every source tensor must
    be mapped exactly once and have the shape the config implies. The output
    is written to a temporary folder beside DST, under a lock on DST, and moved
    into place only when complete; SRC is never modified. SIGINT/SIGTERM
    remove the temporary folder and exit 130/143. The HF config, the mapping used and the
    tokenizer files travel inside MCore checkpoints, so exporting needs no
    original HF folder.

    A checkpoint trained by Megatron-LM (no ckptbridge record) is read too:
    its optimizer and RNG state are skipped unread, and its HF config comes
    from --hf-config, else is synthesized from its args (checked both ways).

    \b
    Examples:
      ckptbridge convert --src hf --dst mcore --tp 4 --pp 2 ./Llama-3.1-8B ./llama-mcore
      ckptbridge convert --src mcore --dst hf --hf-config ./Llama-3.1-8B ./run/checkpoints ./trained-hf
      ckptbridge convert --src mcore --dst hf --vocab-size 128256 ./run/checkpoints ./trained-hf
      ckptbridge convert --src mcore --dst mcore --tp 1 --iteration 2000 ./run/checkpoints ./tp1
    """
    from .convert import Target, convert as run
    from .dtypes import ALL_NAMES
    from .layout import ParallelLayout

    ctx = click.get_current_context()
    if dst_kind == "hf":
        refuse_given(ctx, MCORE_OUTPUT_OPTIONS, "would have no effect with --dst hf (MCore output options)")
    else:
        refuse_given(ctx, HF_OUTPUT_OPTIONS, "would have no effect with --dst mcore (an HF output option)")
    from .interrupts import Interrupted, handled
    from .mapping.schema import MappingWarning
    from .team import Team, given_staging, join, launch, worker_args

    shown: set[str] = set()
    team = Team()
    try:
        if workers > 1 and (given_staging() is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            raise OptionError("--workers starts its own torchrun launch; under torchrun, leave it out")
        team = join()
        argv = worker_args(sys.argv[1:])
        launcher = (lambda folder: launch(argv, workers, folder)) if workers > 1 else None
        quiet = quiet or team.rank > 0 or given_staging() is not None
        target = Target(dst_kind, ParallelLayout(tp, pp, vpp, pp_first, pp_last, ep, etp), ckpt_format, layer_spec,
                        ALL_NAMES[dtype] if dtype else None, vocab_divisible_by, moe_grouped_gemm, dst_iteration,
                        hf_fp8=hf_dtype == "fp8-block", max_shard_bytes=max_shard_size, check_megatron=check_megatron,
                        fast_copy=fast_copy)
        with warnings.catch_warnings(record=True) as caught, handled():  # mapping warnings: one line each, once
            warnings.simplefilter("always", MappingWarning)
            result = run(src, dst, src_kind, target, force, _progress_factory(quiet), config, iteration, clean,
                         allow_nonfinite, allow_rounding, team, launcher)
        for w in caught:
            if issubclass(w.category, MappingWarning) and str(w.message) not in shown:
                shown.add(str(w.message))
                click.secho(f"warning: {w.message}", fg="yellow", err=True)
            elif not issubclass(w.category, MappingWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except Interrupted as exc:
        what = f"DST was already complete: {dst}" if exc.committed else "nothing written"
        click.secho(f"interrupted ({exc}), {what}", fg="red", err=True)
        sys.exit(exc.exit_code)
    finally:
        team.close()
    if team.rank > 0 or given_staging() is not None:
        return  # one summary: rank 0's, or the launcher's
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.restored:
        click.echo(f"note: put back {dst} from {result.restored} (a --force replacement had died half-way)", err=True)
    for left in result.cleaned:
        click.echo(f"removed leftover of an interrupted conversion: {left.describe()}", err=True)
    for left in result.leftovers:
        click.echo(f"note: leftover of an interrupted conversion: {left.describe()}; --clean removes it", err=True)
    click.echo(
        f"{result.src_format} -> {result.dst_format} [{result.family}, {result.layout}, {str(result.dtype).replace('torch.', '')}]: "
        f"{result.tensors} tensors, {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s -> {result.dst}"
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List tensors.")
@click.argument("path", type=click.Path(path_type=Path))
@source_read_options
def inspect(as_json, tensors, path, iteration, config):
    """Detect PATH's format (hf / torch_dist / torch), architecture, layout, dtype and size, and list its tensors.

    For an MCore checkpoint also: who wrote it (ckptbridge, Megatron-LM), the iteration, where its HF config
    comes from and what training state (optimizer, RNG) it holds beside the model.
    """
    from .inspect import describe

    try:
        info = describe(path, config, iteration)
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    if not tensors:
        info.pop("tensors")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)  # one line per fact, however narrow the terminal
    layout = info["layout"]
    lay = "-" if not layout else f"{layout['summary']} ({layout['spec']} spec)"
    console.print(f"[bold]{info['path']}[/]: {info['format']}  {info['architecture']} ({info['family']})  "
                  f"{info['num_layers']} layers  {info['parameters'] / 1e6:.1f}M parameters  {info['dtype']}  layout {lay}")
    for key in ("producer", "iteration", "hf_config", "training_state", "carried"):
        if info.get(key) is not None:
            console.print(f"  {key.replace('_', ' ')}: {info[key]}", highlight=False)
    for note in info.get("notes", []):
        console.print(f"  note: {note}", highlight=False)
    extra = info.get("extra_state")
    if extra:
        console.print(f"  _extra_state: {extra['entries']} entries of {len(extra['modules'])} modules "
                      f"(TransformerEngine state, not weights; --json lists the modules)", highlight=False)
    if tensors:
        table = Table("tensor", "shape", "dtype", "where")
        for t in info["tensors"]:
            table.add_row(t["name"], str(t.get("shape", "bytes")), t.get("dtype", ""), t.get("file", "") + (f" [{t['chunk']}]" if "chunk" in t else "") or str(t.get("chunks", "")))
        console.print(table)


@click.command()
@click.option("--layers", type=int, default=2, show_default=True, help="Number of transformer layers.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_NAMES)), default="fp32", show_default=True)
@click.argument("preset")
@click.argument("out", type=click.Path(path_type=Path))
def example(layers, seed, dtype, preset, out):
    """Build a tiny HF model of PRESET's architecture (real config, shrunk widths, seeded weights) in OUT.

    PRESET is one of the model presets (e.g. llama3.2-1b, qwen3-8b); no download is needed.
    """
    from .dtypes import ALL_NAMES
    from .presets import build_tiny_hf, load_preset

    try:
        load_preset(preset)
        if Path(out).exists():
            raise CkptBridgeError(f"{out} exists")
        build_tiny_hf(preset, out, layers=layers, seed=seed, dtype=ALL_NAMES[dtype])
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    click.echo(f"tiny {preset} ({layers} layers, {dtype}) written to {out}")


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@source_read_options
def compare(a, b, iteration, config):
    """Check that checkpoints A and B hold the same weights, whatever their formats and layouts.

    Exit status 0 when every tensor is bit-identical, 1 otherwise (the differing tensors are listed).
    --iteration and the HF-config options apply to whichever of A and B is an MCore checkpoint.
    """
    from .compare import compare as run

    try:
        diffs = run(a, b, config, iteration)
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    bad = [d for d in diffs if not d.bit_exact]
    for d in bad:
        click.echo(f"DIFF {d.name}: max abs {d.max_abs:.3g}")
    click.echo(f"{len(diffs) - len(bad)}/{len(diffs)} tensors bit-identical")
    sys.exit(1 if bad else 0)


@main.command("list-architectures")
def list_architectures():
    """Architectures with a mapping file, the file that handles each, and the files that are broken."""
    from .mapping import default_registry
    from .mapping.registry import mappings_dir

    try:
        reg = default_registry()
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    width = max((len(f) for f in reg.families), default=10)
    for family in reg.families:
        m = reg.family(family)
        where = "" if reg.file(family).parent.resolve() == mappings_dir().resolve() else f"  [{reg.file(family)}]"
        click.echo(f"{family:{width}s}  {', '.join(m.architectures):34s} {m.description}{where}")
    for r in reg.refused.values():
        click.echo(f"{r.family:{width}s}  {', '.join(r.architectures):34s} REFUSED: {r.reason}")
    for b in reg.broken:
        click.secho(f"{'BROKEN':{width}s}  {b.path}: {b.error.removeprefix(str(b.path) + ': ')}", fg="red")


# light imports: each command imports what it runs when it runs; these need the [align] extra
from .align.cli import align  # noqa: E402
from .converge.cli import converge  # noqa: E402
from .gate.cli import gate  # noqa: E402

for _command in (example, align, converge, gate):
    main.add_command(needs_extra("align", _command))
from .check_cli import check_mapping  # noqa: E402
main.add_command(check_mapping)



def run() -> None:
    """The ``ckptbridge`` console script and ``python -m ckptbridge``: `main`, then the process ends without
    the interpreter's half-second teardown of torch where nothing else is running (see `quick_exit`)."""
    try:
        main(prog_name="ckptbridge")
    except SystemExit as done:
        leave(done)


if __name__ == "__main__":
    run()
