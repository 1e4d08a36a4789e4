"""One student's process, sandboxed with bubblewrap, and the library it is allowed to see.

Why bubblewrap: it is one small setuid-free program in Debian (``apt-get install bubblewrap``),
the sandbox Flatpak is built on, and it needs no daemon, no image and no root: an unprivileged user
namespace gives the student's process its own user, its own process tree (PID namespace: when the
sandbox's first process dies, the kernel kills every process the student started), no network
(a network namespace with only loopback) and a file system made of read-only binds of exactly the
folders named here plus a size-capped private ``/tmp``. Docker would also do, but needs a daemon
and root, which a course's grading laptop or JupyterHub pod often lacks.

What the sandbox sees: the system's ``/usr`` (and the ``/lib``, ``/bin`` links into it), the
Python installation and virtual environment, a copy of ``effml_lib`` with the functions this lab
grades taken out (``library_without``), the three files of the worker, and nothing else: not the
repository, not ``grading/``, the hidden tests, the other submissions, the output folder, the
gradebook, the instructor's home or environment (it starts from an empty environment).

Limits (``Limits``): CPU seconds, address space, file size and open files as rlimits; processes
by a PID cgroup where one can be made (as root), else by ``RLIMIT_NPROC``; output bytes by the
grader's reader (grading/channel.py caps every message, ``drain`` caps stdout and stderr).
"""

from __future__ import annotations

import ast
import compileall
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

GRADING = Path(__file__).resolve().parent
WORKER_FILES = ("worker.py", "channel.py", "bans.py")
INSIDE_GRADER, INSIDE_LIB, INSIDE_TMP = "/effml/grader", "/effml/lib", "/tmp"
PYTHON = os.path.abspath(sys.executable)  # normalised, links kept: a venv's python is one


@dataclass
class Limits:
    cpu_seconds: int = 1800
    memory_bytes: int = 8 * 2**30  # address space; 0: none
    file_bytes: int = 256 * 2**20
    scratch_bytes: int = 512 * 2**20
    processes: int = 64
    open_files: int = 1024
    output_bytes: int = 1 * 2**20  # of stdout and stderr kept for the log
    arena_bytes: int = 512 * 2**20  # shared memory for a performance part's timed calls (touched only as used)


# ----------------------------------------------------------------------------- the library it sees

UNAVAILABLE = "effml_lib.{name} is not available while this lab is graded: the lab asks for your own implementation"

HIDDEN_MODULE = '''"""In the grading sandbox only: where the library's hidden functions went.

Their code is not in this copy of the library. While the notebook runs, a call of one is sent to
the grader, which runs the real function and sends back the result; while the hidden tests call
your code, the grader refuses, and the call raises NotImplementedError.
"""

hook = None  # set by the sandbox's worker


def call(name, params):
    if hook is None:
        raise NotImplementedError(f"effml_lib.{name} is not available while this lab is graded")
    return hook(name, params)
'''


def library_without(hidden: list[str], into: Path) -> Path:
    """A copy of the installed ``effml_lib`` in ``into/effml_lib`` without the code of each name in
    ``hidden``: a function or method ("attention.attention", "model.RMSNorm.forward") keeps its
    signature and sends its call to the grader (effml_lib/_hidden.py in the copy); a class
    ("kvcache.StaticKVCache") has every method raise; a module ("kernels.rope") raises ImportError.
    Nothing a student's code does (``inspect.getsource``, ``importlib.reload``, a subclass, a
    constructor) finds the code, because it is not there. Returns the folder to put on sys.path."""
    import effml_lib

    source = Path(effml_lib.__file__).resolve().parent
    target = into / "effml_lib"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    copy_function=_link_or_copy)
    by_file: dict[Path, list[tuple[str, list[str]]]] = {}
    for name in hidden:
        path, qualname = _resolve(target, name)
        by_file.setdefault(path, []).append((name, qualname))
    for path, names in by_file.items():
        module = ".".join(path.relative_to(target).with_suffix("").parts)
        if any(not q for _, q in names):
            text = f"raise ImportError({UNAVAILABLE.format(name=module)!r})\n"
        else:
            text = _without(path.read_text(), names, module)
        path.unlink()  # perhaps a hard link to the original: write a new file, not through the link
        path.write_text(text)
    (target / "_hidden.py").write_text(HIDDEN_MODULE)
    compileall.compile_dir(str(target), quiet=2)
    return into


def _resolve(package: Path, name: str) -> tuple[Path, list[str]]:
    """ "model.RMSNorm.forward" -> (effml_lib/model.py, ["RMSNorm", "forward"]); "kernels.rope" ->
    (effml_lib/kernels/rope.py, [])."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = package.joinpath(*parts[:cut]).with_suffix(".py")
        if path.is_file():
            return path, parts[cut:]
    raise ValueError(f"hidden name effml_lib.{name}: no such module in the library")


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _without(text: str, names: list[tuple[str, list[str]]], module: str) -> str:
    tree = ast.parse(text)
    wanted = {tuple(q): name for name, q in names}
    found = set()

    def raising(node, name):
        node.body = [ast.Raise(exc=ast.Call(func=ast.Name("NotImplementedError", ast.Load()),
                                            args=[ast.Constant(UNAVAILABLE.format(name=name))], keywords=[]), cause=None)]

    def forwarding(node, name):  # return _effml_hidden("<name>", locals()): the grader runs it, or refuses
        call = ast.Call(func=ast.Name("_effml_hidden", ast.Load()),
                        args=[ast.Constant(name), ast.Call(func=ast.Name("locals", ast.Load()), args=[], keywords=[])],
                        keywords=[])
        node.body = [ast.Return(value=call)]

    def visit(body, prefix):
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            here = (*prefix, node.name)
            if here in wanted:
                found.add(here)
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            raising(item, wanted[here])
                else:
                    forwarding(node, wanted[here])
            elif isinstance(node, ast.ClassDef):
                visit(node.body, here)

    visit(tree.body, ())
    missing = [name for q, name in wanted.items() if q not in found]
    if missing:
        raise ValueError(f"hidden names not found in effml_lib: {', '.join(missing)}")
    imports = [i for i, node in enumerate(tree.body)
               if isinstance(node, ast.ImportFrom) and node.module == "__future__"
               or i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)]
    at = max(imports) + 1 if imports else 0
    tree.body.insert(at, ast.parse("from effml_lib._hidden import call as _effml_hidden").body[0])
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def package_folders(names) -> list[Path]:
    """The folders of installed Python packages that a lab keeps out of the sandbox (grading/parts.py
    ``hide_packages``, e.g. ``"gguf"`` or ``"transformers.integrations.gguf"``): a third-party function
    that answers a part (gguf's own Q4_1 decoder, in lab 05) is hidden as the library's are. Passed as
    ``Sandbox(hide=...)``, each is covered by an empty folder, so nothing in the sandbox imports or
    reads it. A package that is not installed has nothing to hide. The parent packages of a dotted
    name are located, not imported."""
    import importlib.util

    folders = []
    for name in names:
        top, *rest = name.split(".")
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            folder = Path(location).joinpath(*rest)
            if folder.is_dir():
                folders.append(folder.resolve())
    return folders


# ----------------------------------------------------------------------------- bubblewrap

@functools.cache
def bubblewrap() -> str | None:
    """The path of a bwrap that works here (it can make its namespaces), or None."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = subprocess.run([path, "--unshare-all", "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/",
                            "--", "true"], capture_output=True, timeout=30)
    return path if probe.returncode == 0 else None


@functools.cache
def _bwrap_supports(flag: str) -> bool:
    out = subprocess.run([bubblewrap(), "--help"], capture_output=True, text=True).stdout
    return flag in out


def _python_trees() -> list[str]:
    """Folders the sandbox's Python needs: its installation, the venv, their site-packages."""
    trees = {os.path.abspath(sys.base_prefix), os.path.abspath(sys.prefix), str(Path(sys.executable).resolve().parent.parent)}
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        trees.add(sysconfig.get_paths()[key])
    for p in sys.path:
        if p.endswith("site-packages") and os.path.isdir(p):
            trees.add(p)
    out = []
    for tree in sorted(trees, key=len):  # drop folders inside others already listed
        if not any(tree == t or tree.startswith(t.rstrip("/") + "/") for t in out):
            out.append(tree)
    return [t for t in out if not t.startswith("/usr/") and t != "/usr"]


def _site_packages() -> list[str]:
    paths = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    return paths or [sysconfig.get_paths()["purelib"]]


class Sandbox:
    """A worker process (grading/worker.py) for one student, started by ``start`` and killed, with
    every process it started, by ``kill``. ``hide`` lists folders that must not be visible even if
    they lie under one of the binds (the hidden tests, the submissions, the output)."""

    def __init__(self, lib: Path, work: Path, limits: Limits, threads: int = 1, echo: bool = False,
                 hide: tuple[Path, ...] = (), require_sandbox: bool = False):
        self.lib, self.work, self.limits, self.threads, self.echo = lib, work, limits, threads, echo
        self.hide = [Path(p).resolve() for p in hide]
        self.bwrap = bubblewrap()
        if self.bwrap is None and require_sandbox:
            raise RuntimeError("no working bubblewrap (bwrap) here: install Debian's bubblewrap package")
        self.proc: subprocess.Popen | None = None
        self.worker_pid: int | None = None
        self.cgroups: list[Path] = []
        self.output = bytearray()
        self.output_lost = 0

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None

    def start(self):
        from channel import Endpoint

        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        arena_fd = os.memfd_create("effml-arena", os.MFD_ALLOW_SEALING)  # shared memory for timed calls (channel.Arena)
        os.ftruncate(arena_fd, self.limits.arena_bytes)
        import fcntl  # sealed at its size: a sandbox that shrank it would crash the grader's next write (SIGBUS)

        fcntl.fcntl(arena_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        command = self._command(to_worker_r, from_worker_w, arena_fd)
        self.cgroups = _make_cgroups(self.limits) if os.geteuid() == 0 else []
        env = self._env() if self.bwrap is None else {}
        scratch = None
        if self.bwrap is None:
            scratch = self.work / f"scratch-{uuid.uuid4().hex[:8]}"
            (scratch / "home").mkdir(parents=True)
            env = {**env, "HOME": str(scratch / "home"), "TMPDIR": str(scratch), "MPLCONFIGDIR": str(scratch / "home")}
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(to_worker_r, from_worker_w, arena_fd), env=env, cwd=str(scratch) if scratch else None,
            preexec_fn=functools.partial(_limit, self.limits, self.cgroups, self.bwrap is not None))
        os.close(to_worker_r)
        os.close(from_worker_w)
        from channel import Arena

        self.arena = Arena(arena_fd)
        os.close(arena_fd)
        os.set_blocking(to_worker_w, False)
        os.set_blocking(from_worker_r, False)
        threading.Thread(target=self._drain, daemon=True).start()
        self.endpoint = Endpoint(from_worker_r, to_worker_w, max_bytes=512 * 2**20)
        return self.endpoint

    def _drain(self) -> None:
        """Keep the first ``output_bytes`` of what the sandbox writes to stdout/stderr; count the rest."""
        while True:
            chunk = self.proc.stdout.read1(1 << 16)
            if not chunk:
                return
            room = self.limits.output_bytes - len(self.output)
            self.output += chunk[:max(room, 0)]
            self.output_lost += max(len(chunk) - max(room, 0), 0)

    def kill(self) -> None:
        """Kill the sandbox and everything in it; returns once all of it is gone."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for fd in (self.endpoint.read_fd, self.endpoint.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        _remove_cgroups(self.cgroups)
        self.proc = None

    # -- the command
    def _command(self, read_fd: int, write_fd: int, arena_fd: int) -> list[str]:
        site = _site_packages()
        if self.bwrap is None:  # no sandbox: the same worker, the same library, as a plain process
            grader = self.work / "grader"
            if not grader.is_dir():
                grader.mkdir(parents=True)
                for name in WORKER_FILES:
                    shutil.copy(GRADING / name, grader / name)
            path = [str(grader), str(self.lib), *site]
            return [PYTHON, "-I", "-S", str(grader / "worker.py"), str(read_fd), str(write_fd),
                    json.dumps(path), str(arena_fd), *(["--echo"] if self.echo else [])]
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if _bwrap_supports("--disable-userns"):
            args += ["--disable-userns"]
        for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
        for f in ("/etc/ld.so.cache", "/etc/localtime", "/etc/fonts", "/etc/ssl/certs/ca-certificates.crt"):
            if os.path.exists(f):
                args += ["--ro-bind", f, f]
        import effml_lib

        real_lib = str(Path(effml_lib.__file__).resolve().parent)
        secrets = [str(p) for p in [*self.hide, Path(real_lib), self.work, Path.home()]]

        def under(path, trees):
            return any(path == t or path.startswith(t.rstrip("/") + "/") for t in trees)

        system = ["/usr", "/etc"]
        for secret in secrets:  # under a system folder: covered by an empty folder before Python goes in
            if under(secret, system):
                args += ["--tmpfs", secret]
        # The scratch /tmp comes before Python's trees: a venv or a clone under /tmp is bound on top of it,
        # not hidden by it.
        args += ["--size", str(self.limits.scratch_bytes), "--tmpfs", INSIDE_TMP, "--dir", f"{INSIDE_TMP}/home"]
        trees = _python_trees()
        for tree in trees:
            args += ["--ro-bind", tree, tree]
        for secret in secrets:  # under Python's own folders (an installed copy of the library, say)
            if under(secret, trees) and not any(under(t, [secret]) for t in trees):
                args += ["--tmpfs", secret]
        if under(real_lib, [*system, *trees]):
            args += ["--ro-bind", str(self.lib / "effml_lib"), real_lib]  # an installed copy: the stubbed one instead
        args += ["--ro-bind", str(self.lib), INSIDE_LIB]
        for name in WORKER_FILES:
            args += ["--ro-bind", str(GRADING / name), f"{INSIDE_GRADER}/{name}"]
        passwd = self.work / "passwd"
        if not passwd.exists():
            passwd.write_text("student:x:65534:65534:student:/tmp/home:/bin/sh\n")
        args += ["--ro-bind", str(passwd), "/etc/passwd"]
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(16 * 2**20), "--tmpfs", "/dev/shm",
                 "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", INSIDE_TMP,
                 "--clearenv"]  # the root and /dev bwrap builds are tmpfs: made read-only, only /tmp is written
        for key, value in self._env().items():
            args += ["--setenv", key, value]
        path = [INSIDE_GRADER, INSIDE_LIB, *site]
        return [*args, "--", PYTHON, "-I", "-S", f"{INSIDE_GRADER}/worker.py", str(read_fd), str(write_fd),
                json.dumps(path), str(arena_fd), *(["--echo"] if self.echo else [])]

    def _env(self) -> dict:
        threads = str(self.threads)
        return {"HOME": f"{INSIDE_TMP}/home", "USER": "student", "LOGNAME": "student", "LANG": "C.UTF-8",
                "PATH": f"{Path(PYTHON).parent}:/usr/bin:/bin", "TMPDIR": INSIDE_TMP,
                "MPLCONFIGDIR": f"{INSIDE_TMP}/home/.matplotlib", "XDG_CACHE_HOME": f"{INSIDE_TMP}/home/.cache",
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONNOUSERSITE": "1", "TRITON_INTERPRET": "1"}


def _limit(limits: Limits, cgroups: list[Path], sandboxed: bool) -> None:
    """In the child, before bwrap (or the worker) starts: its own session, its rlimits, its cgroups."""
    os.setsid()
    for cgroup in cgroups:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def cap(which, value):
        if value:
            resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_CPU, limits.cpu_seconds)
    cap(resource.RLIMIT_AS, limits.memory_bytes)
    cap(resource.RLIMIT_FSIZE, limits.file_bytes)
    cap(resource.RLIMIT_NOFILE, limits.open_files)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not cgroups and os.geteuid() != 0:  # counted over this user's processes: leave room for the rest
        cap(resource.RLIMIT_NPROC, _processes_of(os.getuid()) + limits.processes)


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


# ----------------------------------------------------------------------------- cgroups (as root)

def _make_cgroups(limits: Limits) -> list[Path]:
    """A PID cgroup (and a memory one) for one sandbox, where the machine lets root make them:
    cgroup v2's unified tree, or v1's pids and memory controllers. [] where it cannot."""
    name = f"effml-{uuid.uuid4().hex[:12]}"
    made = []
    root = Path("/sys/fs/cgroup")
    try:
        if (root / "cgroup.controllers").is_file():  # v2
            group = root / name
            group.mkdir()
            made.append(group)
            (group / "pids.max").write_text(str(limits.processes))
            if limits.memory_bytes:
                (group / "memory.max").write_text(str(limits.memory_bytes))
        else:
            for controller, knob, value in (("pids", "pids.max", limits.processes),
                                            ("memory", "memory.limit_in_bytes", limits.memory_bytes)):
                if not (root / controller).is_dir() or not value:
                    continue
                group = root / controller / name
                group.mkdir()
                made.append(group)
                (group / knob).write_text(str(value))
    except OSError:
        _remove_cgroups(made)
        return []
    return made


def _remove_cgroups(groups: list[Path]) -> None:
    for group in groups:
        try:
            for pid in (group / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.01)
