"""Creates the project's virtual environment (`make`'s .venv), seeing the packages of the
Python that creates it, so a torch already installed there is used rather than downloaded.

    python3 scripts/make_venv.py .venv

``python -m venv --system-site-packages`` exposes the base installation's packages only.
Run from inside another virtual environment (torch installed in a venv, as on many machines
and on the GPU machine's image), the new environment would not see that torch, and
``make`` would install a second one, or fail where there is no network. So when the
creating Python is itself a virtual environment, a ``.pth`` file in the new one adds that
environment's site-packages after its own: what ``make`` installs into .venv still comes
first. They are added as ``site.addsitedir`` calls, which read the ``.pth`` files there
too, so an environment that itself sees another through one (a chain) passes it on.
"""

from __future__ import annotations

import argparse
import site
import subprocess
import sys
import venv
from pathlib import Path

PTH_NAME = "_creating_environment.pth"


def create(directory: Path, with_pip: bool = True) -> None:
    venv.create(directory, system_site_packages=True, with_pip=with_pip)
    if sys.prefix == sys.base_prefix:
        return  # a base installation: --system-site-packages already shows its packages
    python = directory / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    lines = (f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    (Path(purelib) / PTH_NAME).write_text("".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--without-pip", action="store_true", help="do not install pip into it")
    args = parser.parse_args(argv)
    create(args.directory, with_pip=not args.without_pip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
