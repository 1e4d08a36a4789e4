# On Google Colab: install the course's package (its code, the shipped weights and benchmark results)
# from the course repository. Anywhere else, `make lab` or `pip install` has done it, and this cell does
# nothing; once the package is installed, running the cell again does nothing either.
# The address is written in from pyproject.toml's [project.urls]: a fork sets its own there and rebuilds
# (notebooks/README.md).
import importlib.util
import subprocess
import sys

REPOSITORY = "${repository}"
if "google.colab" in sys.modules and importlib.util.find_spec("effml_lib") is None:
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", f"git+{REPOSITORY}"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"could not install the course from {REPOSITORY}:\n{pip.stderr}")
    importlib.invalidate_caches()  # so this running kernel finds the package pip has just added
