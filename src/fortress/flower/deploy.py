"""A secure Flower deployment on this machine: TLS certificates, SuperNode keys, processes.

`fortress deploy-demo` generates a CA, a server certificate and one EC key pair per SuperNode,
starts a SuperLink with TLS and SuperNode authentication (`--enable-supernode-auth`, only
registered public keys may connect), registers the nodes' keys, starts N SuperNodes as separate
processes on loopback, runs the app with `flwr run`, and stops everything it started. The same
pieces, started by hand on several machines, are in the README.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fortress.errors import InputError

ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def app_dir() -> Path:
    """The fortress checkout whose pyproject.toml declares the Flower app."""
    root = Path(__file__).resolve().parents[3]
    project = root / "pyproject.toml"
    if not project.exists() or "[tool.flwr.app]" not in project.read_text():
        raise InputError(f"{root}: no pyproject.toml with [tool.flwr.app]: `flwr run` ships the Flower app from "
                         "a source checkout; clone fortress and pip install -e '.[flower]' there")
    return root


def make_certs(folder: Path, hosts: list[str], days: int = 30) -> dict[str, Path]:
    """A private CA and a server certificate valid for `hosts` (IPs or names); PEM files in folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fortress demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    out = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key", "cert": folder / "server.pem",
           "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(pem))
    out["cert"].write_bytes(cert.public_bytes(pem))
    _private(out["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _private(out["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    return out


def make_node_keys(folder: Path, n: int) -> list[tuple[Path, Path]]:
    """One P-384 key pair per SuperNode in OpenSSH format: (private, public) paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = folder / f"node{i}", folder / f"node{i}.pub"
        _private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + b"\n")
        pairs.append((priv, pub))
    return pairs


def _private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_connection(flwr_home: Path, name: str, address: str, root_cert: Path | None) -> None:
    """The `flwr` CLI's connection to our SuperLink, in an isolated FLWR_HOME."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_cert}"' if root_cert else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Our environment plus Flower's switches; the venv's bin first on PATH (Flower spawns its own tools)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **ENV, "FLWR_HOME": str(flwr_home), "PATH": path}


def flower_bin(name: str) -> str:
    """A Flower executable next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


class Processes:
    """Child processes with their logs; `stop` ends exactly those (SIGTERM, then SIGKILL)."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env, self.procs = folder, env, []

    def start(self, name: str, argv: list[str], append: bool = False) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab" if append else "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder,
                             start_new_session=True)      # its own group: its app subprocesses stop with it
        log.close()
        self.procs.append((name, p))
        return p

    def kill(self, name: str) -> None:
        """SIGKILL one process (and its app subprocesses), as a crash would; it is no longer checked or stopped."""
        for entry in [e for e in self.procs if e[0] == name]:
            if entry[1].poll() is None:
                os.killpg(entry[1].pid, signal.SIGKILL)
            entry[1].wait()
            self.procs.remove(entry)

    def stop(self, timeout: float = 15.0) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.folder / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n{tail}")


def wait_port(port: int, procs: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def run_config_arg(values: dict[str, object]) -> str:
    """A `--run-config` string: strings quoted, numbers and booleans bare."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f'{k}="{v}"')
    return " ".join(parts)


class Deployment:
    """SuperLink + SuperNodes on loopback, as separate processes; a context manager that stops them.

    Secure by default: TLS on the SuperLink (our own CA) and SuperNode authentication, with every
    node's public key registered through `flwr supernode register` before the node starts. `nodes`
    SuperNodes host the users (partition i of `nodes`); `attackers` more run with role=attacker
    (the malicious clients of an attack, no data). With `simulation`, a simulation SuperLink
    (insecure, loopback only) whose Ray backend runs `nodes` virtual SuperNodes on `cpus` CPUs, one
    CPU per ClientApp, and no SuperNode processes (and no attacker node: every virtual node hosts users).
    """

    def __init__(self, folder: Path, nodes: int = 3, secure: bool = True, simulation: bool = False,
                 cpus: int = 2, app: Path | None = None, attackers: int = 0):
        if simulation and attackers:
            raise InputError("--simulation: Flower's simulation gives every virtual node users, so an attack "
                             "(which runs on an attacker node) needs the deployment: leave out --simulation")
        self.folder = Path(folder).resolve()
        self.nodes, self.simulation, self.cpus, self.attackers = nodes, simulation, cpus, attackers
        self.secure = secure and not simulation
        self.app = Path(app).resolve() if app else app_dir()
        self.env = flower_env(self.folder / "flwr-home")
        self.procs = Processes(self.folder, self.env)
        self.port = 0
        self.certs: dict[str, Path] = {}
        self.keys: list[tuple[Path | None, Path | None]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Deployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.secure:
            self.certs = make_certs(self.folder / "certs", ["127.0.0.1", "localhost"])
        write_connection(self.folder / "flwr-home", "fortress", self.address, self.certs.get("ca"))
        link = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.folder / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.secure:
            link += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                     "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"]
        else:
            link += ["--insecure"]
        if self.simulation:
            link += ["--simulation"]
        self.procs.start("superlink", link)
        wait_port(self.port, self.procs)
        if self.simulation:
            return
        n = self.nodes + self.attackers
        keys = make_node_keys(self.folder / "keys", n) if self.secure else [(None, None)] * n
        self.keys = keys
        for i, (priv, pub) in enumerate(keys):
            if pub is not None:
                _flwr(["supernode", "register", str(pub), "fortress"], self.env, self.folder, f"register node{i}")
            if i < self.nodes:
                self.start_supernode(f"supernode{i}", i, priv)
            else:
                self.start_supernode(f"attacker{i - self.nodes}", None, priv)

    def start_supernode(self, name: str, partition: int | None, private_key: Path | None,
                        append: bool = False) -> subprocess.Popen:
        """A SuperNode hosting partition `partition` of `nodes` (None: an attacker node), signing with `private_key`."""
        config = (f"partition-id={partition} num-partitions={self.nodes}" if partition is not None
                  else 'role="attacker"')
        node = [flower_bin("flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
                "--node-config", config]
        if self.secure:
            node += ["--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(private_key)]
        else:
            node += ["--insecure"]
        return self.procs.start(name, node, append)

    def run(self, run_config: dict[str, object] | None = None, timeout: float = 1800.0) -> Path:
        """`flwr run` the app on this federation, streaming its log to flwr-run.log; returns its output folder."""
        return self.wait(self.submit(run_config), timeout)

    def submit(self, run_config: dict[str, object] | None = None) -> subprocess.Popen:
        """Start `flwr run` in the background (its log: flwr-run.log); `wait` for it."""
        values = {"out": str(self.folder / "out"), "min-nodes": self.nodes + self.attackers, **(run_config or {})}
        argv = [flower_bin("flwr"), "run", str(self.app), "fortress", "--stream", "--run-config", run_config_arg(values)]
        if self.simulation:
            argv += ["--federation-config", f"num-supernodes={self.nodes} client-resources-num-cpus=1 "
                                            f"init-args-num-cpus={self.cpus} init-args-logging-level=\"ERROR\""]
        print("$ " + shlex.join(argv), file=sys.stderr)
        self.procs.check_alive()
        self.out, self.submitted = Path(values["out"]), time.time()
        with open(self.log, "wb") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder)

    @property
    def log(self) -> Path:
        return self.folder / "flwr-run.log"

    def wait(self, proc: subprocess.Popen, timeout: float = 1800.0) -> Path:
        """Wait for a submitted `flwr run`; its output folder, or RuntimeError with the log's tail."""
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = f"killed after {timeout:g} s"
        results = self.out / "results.json"
        if code != 0 or not results.exists() or results.stat().st_mtime < self.submitted:
            text = self.log.read_text(errors="replace")
            raise RuntimeError(f"flwr run failed (exit {code}); last lines of {self.log}:\n{text[-3000:]}")
        return self.out

    def kill_node(self, partition: int) -> None:
        """SIGKILL the SuperNode hosting `partition` (a crash: it does not say goodbye to the SuperLink)."""
        self.procs.kill(f"supernode{partition}")

    def rejoin_node(self, partition: int, timeout: float = 180.0) -> subprocess.Popen:
        """Start the SuperNode of `partition` again with its key, so it comes back as the same node.

        The SuperLink refuses to activate a key it still counts online (up to two missed
        heartbeats, about a minute, after a crash); the node exits then, and is started again.
        """
        deadline = time.monotonic() + timeout
        while True:
            p = self.start_supernode(f"supernode{partition}", partition, self.keys[partition][0], append=True)
            try:
                p.wait(10.0)                             # exited within 10 s: not activated
            except subprocess.TimeoutExpired:
                return p
            self.procs.procs.remove((f"supernode{partition}", p))
            if time.monotonic() > deadline:
                raise RuntimeError(f"supernode{partition} did not rejoin within {timeout:g} s")
            time.sleep(5.0)

    def stop(self) -> None:
        self.procs.stop()


def deploy_demo(folder: Path, nodes: int = 3, run_config: dict[str, object] | None = None,
                simulation: bool = False, secure: bool = True, cpus: int = 2, app: Path | None = None,
                timeout: float = 1800.0, attackers: int = 0) -> Path:
    """Start the federation, run the app once, stop everything; returns the run's output folder."""
    with Deployment(folder, nodes, secure, simulation, cpus, app, attackers) as d:
        return d.run(run_config, timeout)


def _flwr(args: list[str], env: dict[str, str], cwd: Path, what: str) -> str:
    done = subprocess.run([flower_bin("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return done.stdout
