# The same in every notebook: the course's plot style, a fixed seed, no autograd (nothing here trains),
# one CPU thread, and show_source, which prints the library code a section explains.
# One thread because on a shared or busy CPU, threads that wait for each other make timings erratic and
# several times slower; on a machine of your own, remove that line to use every core.
import inspect

import torch

from effml_lib.plots import set_style

set_style()
torch.manual_seed(0)
torch.set_grad_enabled(False)
torch.set_num_threads(1)


def show_source(obj):
    """Print the source of a library function or class: the reference code, not hidden."""
    print(inspect.getsource(obj))
