"""`tvq add`, `tvq remove` and `tvq extract`: an archive as the place a team keeps its
fine-tunes, growing and shrinking in place, and any fine-tune back out of it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..report.render import human_bytes, render_extract
from .common import app, echo_plain, print_notes, stdout
from .pack import parse_names


@app.command("add")
def add_command(
    archive: Path = typer.Argument(..., help="The archive to add to (a file or sharded folder)."),
    finetuned: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints or LoRA adapters."),
    pretrained: Path = typer.Option(..., "--pretrained", help="The pretrained checkpoint."),
    name: list[str] = typer.Option([], "--name", help="NAME=PATH: name a task (repeatable)."),
    max_shard_size: str = typer.Option(
        None, "--max-shard-size", help="Sharded archive: a new shard size (default: its own)."
    ),
    threads: int = typer.Option(
        None, "--threads", help="Worker threads (default: all cores this process may use)."
    ),
) -> None:
    """Append tasks to ARCHIVE in place, without re-encoding the tasks already in it."""
    from ..pack import add_tasks

    result = add_tasks(
        archive,
        pretrained,
        finetuned,
        parse_names(name),
        threads=threads,
        max_shard_size=max_shard_size,
    )
    print_notes(result.notes)
    tasks = result.header.tasks
    added = tasks[len(tasks) - len(finetuned) :]
    echo_plain(
        f"added {len(added)} task{'s' if len(added) != 1 else ''} ({', '.join(added)}) to "
        f"{result.path}: now {len(tasks)} tasks, {human_bytes(result.size_bytes)}, "
        f"{result.bits_per_weight:.3f} bits per weight, {result.seconds:.1f} s"
    )


@app.command("remove")
def remove_command(
    archive: Path = typer.Argument(..., help="The archive (a file or sharded folder)."),
    task: list[str] = typer.Option(..., "--task", help="A task to remove (repeatable)."),
) -> None:
    """Drop tasks from ARCHIVE in place; the others are kept exactly as stored."""
    from ..archive.edit import remove_tasks

    header = remove_tasks(archive, task)
    echo_plain(
        f"removed {', '.join(task)} from {archive}: now {len(header.tasks)} tasks "
        f"({', '.join(header.tasks)})"
    )


@app.command("extract")
def extract_command(
    archive: Path = typer.Argument(..., help="The archive (a file or sharded folder)."),
    task: str = typer.Option(..., "--task", help="The task whose fine-tune to rebuild."),
    pretrained: Path = typer.Option(..., "--pretrained", help="The pretrained checkpoint."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="A folder (loads with transformers) or NAME.safetensors."
    ),
    against: Path = typer.Option(
        None,
        "--against",
        help="The original fine-tune: check it is the one packed as TASK, report the error.",
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Folder shard size."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Rebuild one task's fine-tune from ARCHIVE: its dtypes, added tokens, config, tokenizer."""
    from ..merge import extract

    report = extract(
        archive,
        task,
        pretrained,
        out,
        against=against,
        overwrite=force,
        max_shard_size=max_shard_size,
    )
    print_notes(report["notes"])
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_extract(report, stdout)
