"""The harness behind `make test-compose`: a private Docker engine, offline stand-ins for the public base
images, a torch index on this machine's disk, and docker-compose run over the product's own files.

Nothing here edits the product: the stand-ins carry the exact names the Dockerfile and the compose file
use, and test-size settings reach the stack through an override file that compose merges as a user's
would. Everything a run creates lives under one temporary folder that is removed at the end, and a run
killed outright has its folder removed by the next one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import processes
import psutil
import pytest
import yaml

from service.signals import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-service"
SCRATCH_PREFIX = "gpt-compose-"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
# overlay2 shares layers and lives in memory (a tmpfs: this disk discards every freed block, so deleting
# gigabytes of layers takes minutes); vfs, which works on any filesystem, copies every layer in full, too
# much for memory.
STORAGE = (("overlay2", "16g"), ("vfs", None))
DEBIAN_PACKAGES = {"dockerd": "docker.io", "docker": "docker.io", "docker-compose": "docker-compose",
                   "debootstrap": "debootstrap"}  # fmt: skip


def output_tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def require_tools() -> None:
    missing = sorted({package for tool, package in DEBIAN_PACKAGES.items() if shutil.which(tool) is None})
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install -y {' '.join(missing)} (make test-compose does)")


# The engine.


def remove_tree(path: Path) -> None:
    """Unmount what is mounted below `path` (the engine's tmpfs, what a dead engine left), then delete it."""
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{path}/")]
    for target in sorted(targets, key=len, reverse=True):
        processes.run(["umount", "--lazy", target], timeout=60)
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_scratch() -> None:
    """Temporary folders of earlier runs whose pytest no longer lives (killed before it could clean up)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        owner = folder.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            remove_tree(folder)


class Engine:
    """A dockerd of our own: private data root, exec root and socket, so nothing else is touched."""

    def __init__(self, folder: Path, driver: str, memory: str | None):
        self.folder, self.driver = folder, driver
        folder.mkdir()
        if memory:
            processes.run(["mount", "-t", "tmpfs", "-o", f"size={memory},mode=0700", "tmpfs", str(folder)], check=True)
        self.log_path = folder / "dockerd.log"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{folder / 'docker.sock'}"}
        argv = ["dockerd", f"--storage-driver={driver}", "--iptables=false", "--ip6tables=false", "--bridge=none",
                f"--data-root={folder / 'data'}", f"--exec-root={folder / 'exec'}", f"--pidfile={folder / 'pid'}",
                f"--host={self.env['DOCKER_HOST']}"]  # fmt: skip
        with open(self.log_path, "w") as log:
            # SIGTERM, not SIGKILL, if pytest dies: dockerd then stops its containers itself.
            self.process = processes.spawn(
                argv, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM),
            )  # fmt: skip

    def answers(self, timeout: float = 90.0) -> bool:
        """Wait until the engine answers with its storage driver; False if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if self.docker("info", "--format", "{{.Driver}}", check=False).stdout.strip() == self.driver:
                return True
            time.sleep(0.5)
        return False

    def docker(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = processes.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            output = output_tail(result.stdout + result.stderr)
            assert result.returncode == 0, f"docker {' '.join(args)} failed:\n{output}"
        return result

    def inspect(self, kind: str, *names: str) -> list[dict]:
        return json.loads(self.docker(kind, "inspect", *names).stdout)

    def stop(self) -> None:
        processes.stop(self.process, timeout=90)


@contextlib.contextmanager
def private_engine():
    """The first storage driver that works here; the engine is stopped and its folder removed on the way out."""
    remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    engine = None
    try:
        for driver, memory in STORAGE:
            engine = Engine(scratch / driver, driver, memory)
            if engine.answers():
                break
            engine.stop()
        else:
            pytest.fail(f"dockerd started with none of {STORAGE}:\n{output_tail(engine.log_path.read_text())}")
        yield engine
    finally:
        if engine is not None:
            engine.stop()
        remove_tree(scratch)


# Stand-ins for the public base images.


@dataclass(frozen=True)
class Rootfs:
    """A Debian root filesystem from debootstrap, kept as a tarball in the cache between runs on this machine."""

    packages: tuple[str, ...]

    @property
    def path(self) -> Path:
        key = hashlib.sha256(" ".join((SUITE, MIRROR, *self.packages)).encode()).hexdigest()[:12]
        return CACHE / f"rootfs-{SUITE}-{key}.tar"


PYTHON_ROOTFS = Rootfs(("python3.11", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates"))
PROMETHEUS_ROOTFS = Rootfs(("prometheus",))
HAPROXY_ROOTFS = Rootfs(("haproxy",))


def ensure_rootfs(workdir: Path, *wanted: Rootfs) -> None:
    """Make the missing root filesystems in `workdir`, side by side (a minute or two on a tmpfs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    builds = []
    for rootfs in wanted:
        if rootfs.path.exists():
            continue
        target = workdir / rootfs.path.stem
        log = workdir / f"{rootfs.path.stem}.log"
        with open(log, "w") as out:
            include = ",".join(rootfs.packages)
            argv = ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(target), MIRROR]
            builds.append((rootfs, target, log, processes.spawn(argv, stdout=out, stderr=subprocess.STDOUT)))
    for *_, process in builds:
        process.wait(timeout=1200)
    for rootfs, target, log, process in builds:
        try:
            assert process.returncode == 0, f"debootstrap failed:\n{output_tail(log.read_text())}"
            # What a slim image leaves out: the downloaded packages and the package lists.
            for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (target / leftovers).glob("*"):
                    if item.is_file():
                        item.unlink()
            partial = rootfs.path.with_suffix(".partial")
            processes.run(["tar", "-C", str(target), "--numeric-owner", "-cf", str(partial), "."], check=True)
            os.replace(partial, rootfs.path)
        finally:
            remove_tree(target)


def host_pip_files() -> dict[str, Path]:
    """This machine's CA bundle and pip configuration, by the path they take in the image."""
    files = {}
    for name in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"):
        if Path(name).is_file():
            files[name] = Path(name)
    if Path("/etc/xdg/pip").is_dir():
        files.update({f"/etc/xdg/pip/{p.name}": p for p in Path("/etc/xdg/pip").iterdir() if p.is_file()})
    return files


def tiktoken_files() -> dict[str, Path]:
    """The BPE files tiktoken would download at build time (no internet here), placed in the image's cache."""
    source = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not source or not any(Path(source).glob("*")):
        pytest.fail("TIKTOKEN_CACHE_DIR must name a folder holding the GPT-2 BPE (the Makefile sets it from ../shared)")
    target = re.search(r"TIKTOKEN_CACHE_DIR=(\S+)", DOCKERFILE.read_text()).group(1)
    return {f"{target}/{p.name}": p for p in Path(source).iterdir() if p.is_file()}


PYTHON_STANDIN = """\
FROM scratch
ADD rootfs.tar /
COPY host/ /
# As in the official image, pip installs into the system Python.
RUN rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
"""

# The official image's layout: /bin/prometheus as entry point, run as nobody in /prometheus.
PROMETHEUS_STANDIN = """\
FROM scratch
ADD rootfs.tar /
RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


# The official image's layout: the configuration in /usr/local/etc/haproxy, run as user haproxy in the
# foreground under its master process (the entry point adds -W -db), soft-stopped by SIGUSR1.
HAPROXY_STANDIN = """\
FROM scratch
ADD rootfs.tar /
RUN mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
ENTRYPOINT ["haproxy", "-W", "-db"]
CMD ["-f", "/usr/local/etc/haproxy/haproxy.cfg"]
"""


def build_standin(engine: Engine, tag: str, rootfs: Rootfs, dockerfile: str, files: dict[str, Path]) -> None:
    context = Path(tempfile.mkdtemp(prefix="standin-", dir=engine.folder))
    try:
        (context / "Dockerfile").write_text(dockerfile)
        try:
            os.link(rootfs.path, context / "rootfs.tar")
        except OSError:  # the cache on another filesystem
            shutil.copy(rootfs.path, context / "rootfs.tar")
        (context / "host").mkdir()
        for name, source in files.items():
            target = context / "host" / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        engine.docker("build", "--quiet", "--tag", tag, str(context))
    finally:
        shutil.rmtree(context)


def base_images() -> tuple[str, str, str]:
    """The names the product pulls: the Dockerfile's FROM and the prometheus and lb services' images."""
    python = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE).group(1)
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return python, services["prometheus"]["image"], services["lb"]["image"]


def build_standins(engine: Engine) -> None:
    ensure_rootfs(engine.folder, PYTHON_ROOTFS, PROMETHEUS_ROOTFS, HAPROXY_ROOTFS)
    python, prometheus, haproxy = base_images()
    build_standin(engine, python, PYTHON_ROOTFS, PYTHON_STANDIN, {**host_pip_files(), **tiktoken_files()})
    build_standin(engine, prometheus, PROMETHEUS_ROOTFS, PROMETHEUS_STANDIN, {})
    build_standin(engine, haproxy, HAPROXY_ROOTFS, HAPROXY_STANDIN, {})


# The torch index the image's build argument points at.


class TorchIndex:
    """A PEP 503 index: torch from the wheel on this machine's disk, every other project redirected to the
    registry pip uses here. Serves on the host's loopback, which a host-network build reaches."""

    def __init__(self):
        folders = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()]
        wheels = [w for folder in folders if folder.is_dir() for w in folder.glob("torch-*.whl")]
        if not wheels:
            pytest.fail(f"no torch wheel in {' '.join(map(str, folders))} (PIP_FIND_LINKS) for the image's build")
        registry = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
        by_name = {w.name: w for w in wheels}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(self.path)
                if path.rstrip("/") == "/simple/torch":
                    links = "".join(f'<a href="/files/{urllib.parse.quote(n)}">{n}</a>\n' for n in by_name)
                    self._send(len(links.encode()), "text/html")
                    self.wfile.write(links.encode())
                elif path.startswith("/simple/"):
                    self.send_response(302)
                    self.send_header("Location", f"{registry}/{path.removeprefix('/simple/')}")
                    self.end_headers()
                elif path.startswith("/files/") and path.removeprefix("/files/") in by_name:
                    wheel = by_name[path.removeprefix("/files/")]
                    self._send(wheel.stat().st_size, "application/octet-stream")
                    with open(wheel, "rb") as f:
                        shutil.copyfileobj(f, self.wfile)
                else:
                    self.send_error(404)

            def _send(self, length: int, content_type: str):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# docker-compose over the product's files.


# Compose v2 (`docker compose`, the docker CLI's plugin) is not in bookworm, whose docker-compose is 1.29;
# Debian trixie's docker-compose package is v2, one static binary. It is fetched once with apt from a private
# sources list and unpacked into the cache, beside a docker CLI configuration that finds it, never installed.
COMPOSE_V2_SUITE = "trixie"
COMPOSE_V2_CONFIG = CACHE / "docker-config"


def compose_v2_config() -> Path:
    """A DOCKER_CONFIG folder whose cli-plugins hold Compose v2 from Debian trixie (fetched on first use)."""
    plugin = COMPOSE_V2_CONFIG / "cli-plugins" / "docker-compose"
    if plugin.exists():
        return COMPOSE_V2_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = work / "sources.list"
        sources.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} "
                           f"{COMPOSE_V2_SUITE} main\n")  # fmt: skip
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        apt = ["apt-get", "-q", "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
               "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
               "-o", "APT::Sandbox::User=root"]  # fmt: skip
        for step in (["update"], ["download", "docker-compose"]):
            result = processes.run([*apt, *step], cwd=work, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, (
                f"fetching Compose v2 from Debian {COMPOSE_V2_SUITE}: apt-get {' '.join(step)} failed:\n"
                f"{output_tail(result.stdout + result.stderr)}"
            )
        debs = list(work.glob("docker-compose_2*.deb"))
        assert debs, f"Debian {COMPOSE_V2_SUITE}'s docker-compose is not 2.x: {[p.name for p in work.glob('*.deb')]}"
        processes.run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], check=True)
        plugin.parent.mkdir(parents=True, exist_ok=True)
        partial = plugin.with_suffix(".part")
        shutil.copy2(work / "root" / "usr" / "libexec" / "docker" / "cli-plugins" / "docker-compose", partial)
        os.replace(partial, plugin)
    return COMPOSE_V2_CONFIG


# The two Compose implementations the README shows, by the argv that runs each.
COMPOSE_COMMANDS = {"v1.29": ("docker-compose",), "v2": ("docker", "compose")}


@dataclass
class Compose:
    """`docker-compose` (or `docker compose`) -p PROJECT -f docker-compose.yml -f OVERRIDE, against the
    private engine."""

    engine: Engine
    project: str
    override: Path
    env: dict
    command: tuple[str, ...] = COMPOSE_COMMANDS["v1.29"]

    @property
    def name(self) -> str:
        return " ".join(self.command)

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        files = ["-f", str(COMPOSE_FILE), "-f", str(self.override)]
        argv = [*self.command, "--ansi", "never", "-p", self.project, *files, *args]
        return processes.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 900) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, (
            f"`{self.name} {' '.join(args)}` failed with status {result.returncode}:\n"
            f"{output_tail(result.stdout + result.stderr, 60)}"
        )
        return result.stdout

    def container(self, service: str) -> dict:
        """`docker inspect` of the service's one container (running or stopped)."""
        [only] = self.containers(service, expected=1)
        return only

    def containers(self, service: str, expected: int | None = None) -> list[dict]:
        """`docker inspect` of the service's containers (replicas of a scaled service), running or stopped."""
        ids = self.ok("ps", "-a", "-q", service).split()
        assert expected is None or len(ids) == expected, f"expected {expected} {service} containers, found {ids}"
        return self.engine.inspect("container", *ids) if ids else []

    def address(self, container: dict, port: int) -> str:
        """http://IP:PORT of a container on the project's network, which this host reaches through its bridge."""
        [network] = container["NetworkSettings"]["Networks"].values()
        return f"http://{network['IPAddress']}:{port}"

    def logs(self, *services: str, tail: int | str = 40) -> str:
        return self.run("logs", "--no-color", "--timestamps", f"--tail={tail}", *services).stdout

    def leftovers(self) -> dict[str, list[str]]:
        """The project's containers, networks and volumes the engine still holds."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {
            "containers": self.engine.docker("ps", "-a", "-q", "--filter", label).stdout.split(),
            "networks": self.engine.docker("network", "ls", "-q", "--filter", label).stdout.split(),
            "volumes": self.engine.docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        }
        return {kind: names for kind, names in found.items() if names}
