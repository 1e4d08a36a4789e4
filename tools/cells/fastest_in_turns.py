import math
import time


def fastest_in_turns(fns, rounds, warmup=2):
    """The fastest run of each function of ``fns`` ({name: function of no arguments}), in ms, timed in
    turns, one run of each per round: a busy moment of the machine then slows all of them alike rather
    than one of them, and each one's fastest run is the one least disturbed."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = dict.fromkeys(fns, math.inf)
    for round_ in range(warmup + rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:  # the first rounds warm caches and allocators up
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best
