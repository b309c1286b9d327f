"""``nmrestore data ...``: obtaining the data sets nmrestore can fetch by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nmrestore.cli.errors import clean_errors

data_app = typer.Typer(help="Obtain data sets (the 2K photo set from Debian's mate-backgrounds).", no_args_is_help=True)


@data_app.command("photos")
def photos(
    out: Annotated[Path, typer.Option(help="folder to write the photo set to")] = Path("data/photos"),
    deb: Annotated[
        Path | None, typer.Option(help="a mate-backgrounds_*.deb already on disk (default: apt-get download)")
    ] = None,
) -> None:
    """Write 12 nature photographs (1280-2560 px) as HR PNGs: PHOTOS_train_HR (8), _valid_HR (1), _test_HR (3).

    The photographs are Debian's mate-backgrounds (GPL-2+), fetched with `apt-get download
    mate-backgrounds` (no root, nothing installed) or read from --deb FILE or the installed package.
    A second run on a complete folder does nothing.
    """
    from nmrestore.data.photos import obtain_photos

    result = clean_errors(obtain_photos)(out, deb)
    state = "wrote" if result.created else "already complete:"
    counts = ", ".join(f"{split} {n}" for split, n in result.counts.items())
    typer.echo(f"{state} {result.root} ({counts}); licence in {result.root / 'LICENSE.txt'}")
