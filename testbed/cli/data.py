"""Data sets and victims: `mlaas datasets ...`, `mlaas victim ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, cast

import typer
from rich.table import Table

from testbed.cli.common import (
    datasets_app,
    err,
    fail,
    out,
    victim_app,
)


@datasets_app.command("list")
def datasets_list() -> None:
    """List the data sets the testbed knows, and whether each works offline."""
    from mlaas.datasets import describe_datasets

    table = Table("name", "splits", "shape", "offline", "description")
    for info in describe_datasets():
        table.add_row(
            info["name"],
            ", ".join(info["splits"]),
            str(info["native_shape"]),
            "yes" if info["offline"] else "no",
            info["description"],
        )
    out.print(table)


@datasets_app.command("prepare")
def datasets_prepare(
    names: Annotated[list[str], typer.Argument(help="Data sets to make available locally")],
) -> None:
    """Find or fetch data sets now (Debian's package, MLAAS_DATA_DIR or a download)."""
    from mlaas.datasets import DatasetUnavailable, load_dataset

    for name in names:
        try:
            loaded = load_dataset(name)
        except (DatasetUnavailable, ValueError) as exc:
            raise fail(str(exc)) from exc
        err.print(f"[green]{name}[/]: {len(loaded)} images at {loaded.shape}")


@victim_app.command("train")
def victim_train(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write")] = Path(
        "var/victims/fashion"
    ),
    dataset: Annotated[str, typer.Option(help="Registered data set or ImageFolder path")] = (
        "fashion-mnist"
    ),
    arch: Annotated[str, typer.Option(help="Architecture (see mlaas.models)")] = "cnn-small",
    epochs: int = 3,
    batch_size: int = 128,
    optimizer: Annotated[str, typer.Option(help="adam or sgd")] = "adam",
    lr: Annotated[float | None, typer.Option(help="Default per optimizer")] = None,
    schedule: Annotated[str, typer.Option(help="none, cosine, onecycle or step")] = "onecycle",
    augment: bool = False,
    pretrained: Annotated[
        str | None, typer.Option(help="'imagenet' for torchvision's weights (needs them)")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="CxHxW, default: the data set's, enlarged if needed")
    ] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    name: Annotated[str | None, typer.Option(help="Model name in the card")] = None,
    train_size: Annotated[
        int | None, typer.Option(help="Train on a seeded subset of this size (quick trials)")
    ] = None,
) -> None:
    """Train a victim model and write a directory that `mlaas serve --victim` takes."""
    from mlaas.datasets import DatasetUnavailable
    from mlaas.images import InputShape
    from mlaas.models import PretrainedWeightsUnavailable
    from mlaas.training import TrainConfig
    from testbed.victim import train_victim

    try:
        # The options are free text on the command line: TrainConfig checks both names and
        # raises ValueError for an unknown one, which is reported below.
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            optimizer=cast(Literal["adam", "sgd"], optimizer),
            lr=lr,
            schedule=cast(Literal["none", "cosine", "onecycle", "step"], schedule),
            augment=augment,
            seed=seed,
            device=device,
        )
        shape = InputShape.parse(input_shape) if input_shape else None
        card = train_victim(
            out_dir,
            dataset=dataset,
            arch=arch,
            config=config,
            shape=shape,
            pretrained=pretrained,
            name=name,
            train_size=train_size,
        )
    except (DatasetUnavailable, PretrainedWeightsUnavailable, ValueError) as exc:
        raise fail(str(exc)) from exc
    err.print(
        f"[green]victim written to {out_dir}[/]: {card.architecture} on {card.dataset}, "
        f"test accuracy {card.test_accuracy:.2%}, {card.training_seconds:.0f} s"
    )


@victim_app.command("oracle")
def victim_oracle(
    victim: Annotated[Path, typer.Option(help="Victim directory")] = Path("var/victims/fashion"),
    test_set: Annotated[str, typer.Option(help="The test split to label")] = ("fashion-mnist:test"),
    out: Annotated[Path, typer.Option("--out", help=".npy file to write")] = Path("var/oracle.npy"),
) -> None:
    """Write the victim's top-1 labels on a test split: an attack's fidelity reference."""
    import numpy as np

    from mlaas.datasets import load_dataset
    from mlaas.modelstore import load_model
    from mlaas.training import predict_proba

    model, card = load_model(victim)
    labels = predict_proba(model, load_dataset(test_set, card.shape)).argmax(axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, labels.astype(np.int64))
    err.print(f"wrote {len(labels)} victim labels on {test_set} to {out}")
