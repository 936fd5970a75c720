#!/usr/bin/env python3
"""Bring up (or down) a local DIRAC 9.1.22 server for Airlock's DIRAC upstream tests.

    setup_dirac.py up DIR     # apt deps, venv, certificates, dirac.cfg, databases, services, DIR/env.sh
    setup_dirac.py down DIR   # stop the services this script started in DIR

Stdlib only: it runs with the system python3. Everything DIRAC runs under DIR/venv/bin/python.
Every service is contacted on localhost only and bound to 127.0.0.1 (the launcher patches DIRAC's
server socket, which otherwise listens on all interfaces).

Layout of DIR:
  venv/                      DIRAC 9.1.22 (pip --no-deps, dependencies listed here, no gfal2-python)
  etc/dirac.cfg              the whole configuration (DIRACSYSCONFIG); no Configuration Server
  etc/grid-security/         hostcert.pem/hostkey.pem (CN=localhost), certificates/ (CA, hash links)
  gateway/                   the gateway's identity (a Registry host with GenericPilot, TrustedHost, ...)
  users/alice/               alice's user certificate and key; proxy.pem made by dirac-proxy-init
  storage/                   sandboxes (SandboxStore) and BOINC-SE (StorageElement)
  bin/                       launcher and post-start helpers (written by this script)
  run/*.pid, logs/*.log      the background processes
  env.sh                     the environment a DIRAC client needs
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DIRAC_VERSION = "9.1.22"

APT_PACKAGES = ["pkg-config", "libmariadb-dev", "swig", "libssl-dev", "gcc", "mariadb-client", "openssl"]

# DIRAC's Requires-Dist for 9.1.22 without gfal2-python (its build fails against Debian's gfal2), plus
# the "server" extras the services import. Installed after `pip install --no-deps DIRAC==9.1.22`.
REQUIREMENTS = """
DIRACCommon==9.1.22
boto3>=1.35
botocore>=1.35
cachetools
certifi
cwltool
diraccfg
diracx-client
diracx-core
diracx-cli
db12
fabric
fts3
importlib_metadata>=4.4
importlib_resources
invoke
M2Crypto>=0.50
packaging
paramiko
pexpect
prompt-toolkit>=3
psutil
pyasn1
pyasn1-modules
pydantic>=2.4
pyparsing
python-dateutil
pytz
requests
rucio-clients>=34.4.2
sqlalchemy
typing_extensions>=4.3.0
Authlib>=1.0.0.a2
pyjwt
dominate
zstandard
xattr
mysqlclient
opensearch-py
CMRESHandler
python-json-logger
pyyaml
numpy
stomp.py
"""

VO = "airlock"
SITE = "BOINC.Airlock.org"
CE = "boinc.airlock.org"
QUEUE = "boinc"
SE = "BOINC-SE"
SANDBOX_SE = "ProductionSandboxSE"
USER = "alice"
USER_GROUP = "dirac_user"
PILOT_GROUP = "airlock_pilot"  # the gateway as a user, for a proxy of its certificate
CA_DN = "/O=Airlock/CN=Airlock DIRAC Test CA"
HOST_DN = "/O=Airlock/CN=localhost"
GATEWAY_DN = "/O=Airlock/CN=airlock-gateway"
USER_DN = "/O=Airlock/OU=Users/CN=alice"

# (system, service, port offset); the first group runs in one process, the second in another
WMS_SERVICES = [
    ("WorkloadManagement", "JobManager", 0),
    ("WorkloadManagement", "JobMonitoring", 1),
    ("WorkloadManagement", "JobStateUpdate", 2),
    ("WorkloadManagement", "Matcher", 3),
    ("WorkloadManagement", "OptimizationMind", 4),
    ("WorkloadManagement", "SandboxStore", 5),
    ("ResourceStatus", "ResourceStatus", 6),
    ("ResourceStatus", "ResourceManagement", 7),
]
DMS_SERVICES = [
    ("DataManagement", "FileCatalog", 8),
    ("DataManagement", "StorageElement", 9),
]
DATABASES = {
    # name: (system, sql file inside the DIRAC package or None when the DB creates its own tables)
    "JobDB": ("WorkloadManagement", "WorkloadManagementSystem/DB/JobDB.sql"),
    "JobLoggingDB": ("WorkloadManagement", "WorkloadManagementSystem/DB/JobLoggingDB.sql"),
    "TaskQueueDB": ("WorkloadManagement", "WorkloadManagementSystem/DB/TaskQueueDB.sql"),
    "PilotAgentsDB": ("WorkloadManagement", "WorkloadManagementSystem/DB/PilotAgentsDB.sql"),
    "SandboxMetadataDB": ("WorkloadManagement", "WorkloadManagementSystem/DB/SandboxMetadataDB.sql"),
    "ResourceStatusDB": ("ResourceStatus", "ResourceStatusSystem/DB/ResourceStatusDB.sql"),
    "ResourceManagementDB": ("ResourceStatus", "ResourceStatusSystem/DB/ResourceManagementDB.sql"),
    "FileCatalogDB": ("DataManagement", "DataManagementSystem/DB/FileCatalogDB.sql"),
}

DB_USER = "airlock_dirac"
DB_PASSWORD = "airlock-dirac-test"

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[dirac-up {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


class Settings:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.port_base = env_int("AIRLOCK_DIRAC_PORT_BASE", 29140)
        self.prefix = os.environ.get("AIRLOCK_DIRAC_DB_PREFIX", "airlock_dirac_")
        if not self.prefix.replace("_", "").isalnum():
            raise SystemExit(f"AIRLOCK_DIRAC_DB_PREFIX must be alphanumeric/underscore: {self.prefix!r}")
        self.mysql_host = os.environ.get("AIRLOCK_DIRAC_MYSQL_HOST", "127.0.0.1")
        self.mysql_port = env_int("AIRLOCK_DIRAC_MYSQL_PORT", 3306)
        self.mysql_admin = os.environ.get("AIRLOCK_DIRAC_MYSQL_ADMIN_USER", "root")
        self.mysql_admin_pw = os.environ.get("AIRLOCK_DIRAC_MYSQL_ADMIN_PASSWORD", "")
        self.wheels = Path(
            os.environ.get("AIRLOCK_DIRAC_WHEELS", str(Path.home() / ".cache" / "airlock-dirac" / "wheels"))
        )
        self.lifetime = env_int("AIRLOCK_DIRAC_LIFETIME", 6 * 3600)
        self.venv = self.root / "venv"
        self.python = self.venv / "bin" / "python"
        self.etc = self.root / "etc"
        self.cfg = self.etc / "dirac.cfg"
        self.gsec = self.etc / "grid-security"
        self.cadir = self.gsec / "certificates"
        self.cawork = self.root / "ca"
        self.gateway = self.root / "gateway"
        self.users = self.root / "users"
        self.storage = self.root / "storage"
        self.bin = self.root / "bin"
        self.run = self.root / "run"
        self.logs = self.root / "logs"
        self.alice_proxy = self.users / USER / "proxy.pem"
        self.gateway_proxy = self.gateway / "proxy.pem"

    def port(self, offset: int) -> int:
        return self.port_base + offset

    def client_env(self) -> dict[str, str]:
        return {
            "DIRACSYSCONFIG": str(self.cfg),
            "DIRAC_ROOT_PATH": str(self.root),
            "X509_CERT_DIR": str(self.cadir),
            "X509_VOMS_DIR": str(self.gsec / "vomsdir"),
            "X509_VOMSES": str(self.gsec / "vomses"),
            "DIRAC_NO_CFG": "",
            "AIRLOCK_DIRAC_GATEWAY_CERT": str(self.gateway / "cert.pem"),
            "AIRLOCK_DIRAC_GATEWAY_KEY": str(self.gateway / "key.pem"),
            "AIRLOCK_DIRAC_GATEWAY_PROXY_FILE": str(
                self.gateway_proxy
            ),  # set AIRLOCK_DIRAC_GATEWAY_PROXY to use it
            "AIRLOCK_DIRAC_USER_CERT": str(self.users / USER / "usercert.pem"),
            "AIRLOCK_DIRAC_USER_KEY": str(self.users / USER / "userkey.pem"),
            "AIRLOCK_DIRAC_PYTHON": str(self.python),
            "AIRLOCK_DIRAC_SE": SE,
            "AIRLOCK_DIRAC_SITE": SITE,
            "AIRLOCK_DIRAC_CE": CE,
            "AIRLOCK_DIRAC_QUEUE": QUEUE,
            "AIRLOCK_DIRAC_VO": VO,
            "AIRLOCK_DIRAC_USER_GROUP": USER_GROUP,
        }


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("check", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)  # type: ignore[call-overload,no-any-return]


# ---------------------------------------------------------------- system packages


def ensure_apt() -> None:
    missing = [p for p in APT_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)} (slow: apt)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run([*sudo, "apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
    run([*sudo, "apt-get", "install", "-y", "-qq", *missing], env=env, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- venv


def ensure_venv(s: Settings) -> None:
    stamp = s.venv / f".airlock-dirac-{DIRAC_VERSION}"
    if stamp.exists() and s.python.exists():
        log(f"venv reused: {s.venv}")
        return
    if s.venv.exists():
        shutil.rmtree(s.venv)
    log(f"creating {s.venv}")
    run([sys.executable, "-m", "venv", str(s.venv)])
    s.wheels.mkdir(parents=True, exist_ok=True)
    req = s.root / "requirements-dirac.txt"
    req.write_text(REQUIREMENTS.strip() + "\n")
    pip = [str(s.python), "-m", "pip", "--disable-pip-version-check", "-q"]
    local = ["--no-index", "--find-links", str(s.wheels)]
    quiet = {"stderr": subprocess.PIPE}

    def try_local() -> bool:
        a = subprocess.run([*pip, "install", *local, "--no-deps", f"DIRAC=={DIRAC_VERSION}"], **quiet)
        if a.returncode:
            return False
        b = subprocess.run([*pip, "install", *local, "-r", str(req)], **quiet)
        return b.returncode == 0

    if not try_local():
        log(f"filling the wheel cache {s.wheels} (slow on a cold cache: builds M2Crypto, mysqlclient)")
        run([*pip, "download", "--no-deps", "-d", str(s.wheels), f"DIRAC=={DIRAC_VERSION}"])
        run([*pip, "wheel", "-w", str(s.wheels), "--find-links", str(s.wheels), "-r", str(req)])
        if not try_local():
            raise SystemExit("pip install from the wheel cache failed")
    log("venv ready")
    stamp.write_text(DIRAC_VERSION + "\n")


def dirac_pkg(s: Settings) -> Path:
    out = run(
        [
            str(s.python),
            "-c",
            "import importlib.util as u; print(u.find_spec('DIRAC').submodule_search_locations[0])",
        ],
        capture_output=True,
    ).stdout.strip()
    return Path(out)


# ---------------------------------------------------------------- certificates

OPENSSL_CNF = """
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ v3_ca ]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ v3_host ]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ v3_gateway ]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ v3_user ]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment, dataEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def ensure_certs(s: Settings) -> None:
    stamp = s.cawork / ".done"
    if stamp.exists():
        log("certificates reused")
        return
    log("creating CA, host (CN=localhost), gateway and alice certificates")
    for d in (s.cawork, s.cadir, s.gateway, s.users / USER):
        d.mkdir(parents=True, exist_ok=True)
    cnf = s.cawork / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    cakey, cacert = s.cawork / "ca.key", s.cawork / "ca.pem"
    run(["openssl", "genrsa", "-out", str(cakey), "2048"], capture_output=True)
    run(
        ["openssl", "req", "-new", "-x509", "-key", str(cakey), "-out", str(cacert), "-days", "3650",
         "-subj", CA_DN, "-config", str(cnf), "-extensions", "v3_ca", "-sha256"],
        capture_output=True,
    )  # fmt: skip
    serial = [100]

    def issue(dn: str, ext: str, cert: Path, key: Path) -> None:
        csr = s.cawork / (cert.stem + ".csr")
        run(["openssl", "genrsa", "-out", str(key), "2048"], capture_output=True)
        run(["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", dn, "-config", str(cnf)],
            capture_output=True)  # fmt: skip
        serial[0] += 1
        run(
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(cacert), "-CAkey", str(cakey),
             "-set_serial", str(serial[0]), "-days", "1825", "-sha256", "-out", str(cert),
             "-extfile", str(cnf), "-extensions", ext],
            capture_output=True,
        )  # fmt: skip
        key.chmod(0o400)

    issue(HOST_DN, "v3_host", s.gsec / "hostcert.pem", s.gsec / "hostkey.pem")
    issue(GATEWAY_DN, "v3_gateway", s.gateway / "cert.pem", s.gateway / "key.pem")
    issue(USER_DN, "v3_user", s.users / USER / "usercert.pem", s.users / USER / "userkey.pem")
    # the trust store: CA file under its subject hash, with a Globus signing policy (and an empty CRL)
    h = run(
        ["openssl", "x509", "-in", str(cacert), "-noout", "-subject_hash"], capture_output=True
    ).stdout.strip()
    shutil.copy(cacert, s.cadir / "airlock-dirac-ca.pem")
    link = s.cadir / f"{h}.0"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("airlock-dirac-ca.pem")
    (s.cadir / f"{h}.signing_policy").write_text(
        f"access_id_CA X509 '{CA_DN}'\npos_rights globus CA:sign\ncond_subjects globus '\"/O=Airlock/*\"'\n"
    )
    (s.cadir / f"{h}.namespaces").write_text(f'TO Issuer "{CA_DN}" \\\n  PERMIT Subject "/O=Airlock/.*"\n')
    idx = s.cawork / "index.txt"
    idx.write_text("")
    (s.cawork / "crl.cnf").write_text(
        OPENSSL_CNF + f"\n[ ca ]\ndefault_ca = cadef\n[ cadef ]\ndatabase = {idx}\ndefault_md = sha256\n"
        f"crlnumber = {s.cawork / 'crlnumber'}\ndefault_crl_days = 3650\n"
    )
    (s.cawork / "crlnumber").write_text("01\n")
    run(
        ["openssl", "ca", "-gencrl", "-keyfile", str(cakey), "-cert", str(cacert),
         "-out", str(s.cadir / f"{h}.r0"),
         "-config", str(s.cawork / "crl.cnf")],
        capture_output=True,
    )  # fmt: skip
    (s.gsec / "vomsdir").mkdir(exist_ok=True)
    (s.gsec / "vomses").mkdir(exist_ok=True)
    stamp.write_text("ok\n")


# ---------------------------------------------------------------- dirac.cfg


def cfg_text(s: Settings) -> str:
    def url(system: str, service: str, offset: int) -> str:
        return f"dips://localhost:{s.port(offset)}/{system}/{service}"

    def services_section(system: str) -> tuple[str, str]:
        svc, urls = [], []
        for sysname, name, off in WMS_SERVICES + DMS_SERVICES:
            if sysname != system:
                continue
            extra = SERVICE_EXTRA.get(name, "")
            svc.append(
                f"      {name}\n      {{\n        Port = {s.port(off)}\n{extra}"
                "        Authorization\n        {\n          Default = authenticated\n"
                f"{AUTH_EXTRA.get(name, '')}        }}\n      }}\n"
            )
            urls.append(f"      {name} = {url(system, name, off)}\n")
        return "".join(svc), "".join(urls)

    sandbox_path = s.storage / "sandboxes"
    se_path = s.storage / "se"
    SERVICE_EXTRA = {
        "JobManager": "        MaxParametricJobs = 100\n",
        "Matcher": "        MaxThreads = 20\n",
        "SandboxStore": (
            f"        LocalSE = {SANDBOX_SE}\n        BasePath = {sandbox_path}\n"
            "        MaxSandboxSizeMiB = 100\n"
            "        UseDiracXBackend = False\n        UseDiracXBackendOnly = False\n"
        ),
        "FileCatalog": (
            "        UserGroupManager = UserAndGroupManagerDB\n        SEManager = SEManagerDB\n"
            "        SecurityManager = NoSecurityManager\n        DirectoryManager = DirectoryLevelTree\n"
            "        FileManager = FileManager\n        UniqueGUID = False\n        GlobalReadAccess = True\n"
            "        LFNPFNConvention = Strong\n        ResolvePFN = True\n        DefaultUmask = 509\n"
            "        VisibleStatus = AprioriGood\n"
        ),
        "StorageElement": f"        BasePath = {se_path}\n        MaxStorageSize = 0\n",
    }
    file_transfer = "          FileTransfer\n          {\n            Default = authenticated\n          }\n"
    AUTH_EXTRA = {
        "SandboxStore": file_transfer,
        "StorageElement": file_transfer,
        "Matcher": "          getActiveTaskQueues = JobAdministrator\n",
    }
    dbs: dict[str, str] = {}
    for name, (system, _sql) in DATABASES.items():
        dbs[system] = (
            dbs.get(system, "") + f"      {name}\n      {{\n        DBName = {s.prefix}{name}\n      }}\n"
        )

    systems = ""
    for system in ("WorkloadManagement", "ResourceStatus", "DataManagement"):
        svc, urls = services_section(system)
        extra = ""
        if system == "WorkloadManagement":
            extra = (
                "    Executors\n    {\n      Optimizers\n      {\n"
                "        Load = JobPath, JobSanity, InputData, JobScheduling\n"
                "        LogLevel = INFO\n      }\n"
                "      JobPath\n      {\n      }\n      JobSanity\n      {\n      }\n"
                "      InputData\n      {\n      }\n"
                "      JobScheduling\n      {\n        RescheduleDelays = 0\n      }\n    }\n"
                "    JobWrapper\n    {\n      MinOutputDataBufferGB = 0\n    }\n"
            )
        systems += (
            f"  {system}\n  {{\n    Databases\n    {{\n{dbs.get(system, '')}    }}\n"
            f"    Services\n    {{\n{svc}    }}\n    URLs\n    {{\n{urls}    }}\n{extra}  }}\n"
        )

    host_props = "TrustedHost, CSAdministrator, JobAdministrator, FullDelegation, Operator, SiteManager"
    gw_props = "GenericPilot, TrustedHost, JobAdministrator, LimitedDelegation"
    return f"""# Written by scripts/dirac/setup_dirac.py -- regenerated by every `up`
DIRAC
{{
  VirtualOrganization = {VO}
  Hostname = localhost
  Security
  {{
    CertFile = {s.gsec / "hostcert.pem"}
    KeyFile = {s.gsec / "hostkey.pem"}
    CALocation = {s.cadir}
    SkipCAChecks = yes
  }}
  Configuration
  {{
    Name = AirlockLocal
  }}
}}
DiracX
{{
  DisabledVOs = {VO}
}}
LocalSite
{{
  Site = {SITE}
  GridCE = {CE}
  CEQueue = {QUEUE}
}}
Systems
{{
  Databases
  {{
    User = {DB_USER}
    Password = {DB_PASSWORD}
    Host = {s.mysql_host}
    Port = {s.mysql_port}
  }}
{systems}}}
Registry
{{
  DefaultGroup = {USER_GROUP}
  VO
  {{
    {VO}
    {{
      VOAdmin = {USER}
      DefaultGroup = {USER_GROUP}
    }}
  }}
  Users
  {{
    {USER}
    {{
      DN = {USER_DN}
      Email = {USER}@airlock.invalid
    }}
    # the gateway's DN also as a user: a proxy of its certificate (group {PILOT_GROUP}) is a GenericPilot
    airlock-gateway
    {{
      DN = {GATEWAY_DN}
      Email = gateway@airlock.invalid
    }}
  }}
  Groups
  {{
    {USER_GROUP}
    {{
      Users = {USER}
      Properties = NormalUser
      VO = {VO}
    }}
    {PILOT_GROUP}
    {{
      Users = airlock-gateway
      Properties = GenericPilot, LimitedDelegation
      VO = {VO}
    }}
    # DIRAC 9.1's JobManager builds its JobPolicy from the caller's *group* properties; a host
    # certificate authenticates as group "hosts", so without this a host may not reschedule jobs
    hosts
    {{
      Users =
      Properties = GenericPilot
    }}
  }}
  Hosts
  {{
    localhost
    {{
      DN = {HOST_DN}
      Properties = {host_props}
    }}
    airlock-gateway
    {{
      DN = {GATEWAY_DN}
      Properties = {gw_props}
    }}
  }}
}}
Resources
{{
  Sites
  {{
    BOINC
    {{
      {SITE}
      {{
        Name = {SITE}
        CE = {CE}
        SE = {SE}
        CEs
        {{
          {CE}
          {{
            CEType = BOINC
            SubmissionMode = Direct
            Queues
            {{
              {QUEUE}
              {{
                maxCPUTime = 2880
                SI00 = 1000
                MaxTotalJobs = 1000
                MaxWaitingJobs = 1000
              }}
            }}
          }}
        }}
      }}
    }}
  }}
  StorageElements
  {{
    {SANDBOX_SE}
    {{
      BackendType = DISET
      AccessProtocols = dips
      WriteProtocols = dips
      DIP
      {{
        Host = localhost
        Port = {s.port(5)}
        PluginName = DIP
        Protocol = dips
        Path = /WorkloadManagement/SandboxStore
        Access = remote
      }}
    }}
    {SE}
    {{
      BackendType = DISET
      AccessProtocols = dips
      WriteProtocols = dips
      DIP
      {{
        Host = localhost
        Port = {s.port(9)}
        PluginName = DIP
        Protocol = dips
        Path = /DataManagement/StorageElement
        Access = remote
      }}
    }}
  }}
  FileCatalogs
  {{
    FileCatalog
    {{
      CatalogType = FileCatalog
      AccessType = Read-Write
      Status = Active
      Master = True
      CatalogURL = DataManagement/FileCatalog
    }}
  }}
}}
Operations
{{
  Defaults
  {{
    Services
    {{
      Catalogs
      {{
        CatalogList = FileCatalog
      }}
    }}
    DataManagement
    {{
      RegistrationProtocols = dips
      AccessProtocols = dips
      WriteProtocols = dips
    }}
    ResourceStatus
    {{
      Config
      {{
        State = Active
        Cache = 60
        StatusTypes
        {{
          default = all
          StorageElement = ReadAccess, WriteAccess, CheckAccess, RemoveAccess
        }}
      }}
    }}
    JobDescription
    {{
      AllowedJobTypes = User, Test
    }}
    # no Accounting/Monitoring services here: data operations are not reported anywhere
    MonitoringBackends
    {{
      Default =
    }}
  }}
}}
"""


# ---------------------------------------------------------------- databases


def mysql(s: Settings, sql: str, db: str | None = None) -> str:
    cmd = ["mysql", "-h", s.mysql_host, "-P", str(s.mysql_port), "-u", s.mysql_admin, "--batch", "-N"]
    if s.mysql_admin_pw:
        cmd.append(f"-p{s.mysql_admin_pw}")
    if db:
        cmd.append(db)
    return run(cmd, input=sql, capture_output=True).stdout


def ensure_mysql_up(s: Settings) -> None:
    for _ in range(30):
        try:
            mysql(s, "SELECT 1;")
            return
        except subprocess.CalledProcessError as exc:
            err = exc.stderr
        time.sleep(1)
    raise SystemExit(f"MariaDB not reachable at {s.mysql_host}:{s.mysql_port} as {s.mysql_admin}: {err}")


def create_databases(s: Settings, pkg: Path) -> None:
    log(f"re-creating databases {s.prefix}*")
    stmts = []
    for host in ("localhost", "127.0.0.1"):
        stmts.append(f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{DB_PASSWORD}';")
        stmts.append(
            f"GRANT ALL PRIVILEGES ON `{s.prefix.replace('_', chr(92) + '_')}%`.* TO '{DB_USER}'@'{host}';"
        )
    for name in DATABASES:
        stmts.append(f"DROP DATABASE IF EXISTS `{s.prefix}{name}`; CREATE DATABASE `{s.prefix}{name}`;")
    stmts.append("FLUSH PRIVILEGES;")
    mysql(s, "\n".join(stmts))
    for name, (_system, sql) in DATABASES.items():
        text = (pkg / sql).read_text()
        text = text.replace(f"USE {name};", f"USE `{s.prefix}{name}`;")
        mysql(s, text, db=f"{s.prefix}{name}")


# ---------------------------------------------------------------- processes

LAUNCHER = r'''
"""Launch DIRAC services/executors with Airlock's local-test patches (written by setup_dirac.py).

- JobParametersDB is OpenSearch-only in DIRAC 9.1: a dict-backed stand-in replaces it (per process).
- DIRAC's DISET server binds all interfaces: bind to AIRLOCK_DIRAC_BIND (127.0.0.1) instead.
- JobScheduling: RescheduleDelays read from the CS are strings; compared with ints (TypeError).
"""
import os
import sys
import threading

mode = sys.argv.pop(1)

import DIRAC.WorkloadManagementSystem.DB.JobParametersDB as _jpmod  # noqa: E402
from DIRAC import S_OK  # noqa: E402


class DictJobParametersDB:
    _lock = threading.Lock()
    _docs = {}

    def __init__(self, *args, **kwargs):
        pass

    def getJobParameters(self, jobIDs, vo=None, paramList=None):
        if isinstance(jobIDs, (int, str)):
            jobIDs = [jobIDs]
        if isinstance(paramList, str):
            paramList = paramList.replace(" ", "").split(",")
        out = {}
        with self._lock:
            for j in jobIDs:
                doc = self._docs.get(int(j))
                if doc is None:
                    continue
                out[int(j)] = {k: v for k, v in doc.items() if not paramList or k in paramList}
        return S_OK(out)

    def setJobParameter(self, jobID, key, value, vo=None):
        with self._lock:
            self._docs.setdefault(int(jobID), {})[key] = value
        return S_OK()

    def setJobParameters(self, jobID, parameters, vo=None):
        with self._lock:
            self._docs.setdefault(int(jobID), {}).update(dict(parameters))
        return S_OK()

    def deleteJobParameters(self, jobID, paramList=None, vo=""):
        if isinstance(paramList, str):
            paramList = paramList.replace(" ", "").split(",")
        with self._lock:
            doc = self._docs.get(int(jobID), {})
            if not paramList:
                self._docs.pop(int(jobID), None)
            else:
                for k in paramList:
                    doc.pop(k, None)
        return S_OK()


_jpmod.JobParametersDB = DictJobParametersDB

from DIRAC.Core.DISET.private.Transports import M2SSLTransport as _t  # noqa: E402

_bind = os.environ.get("AIRLOCK_DIRAC_BIND", "127.0.0.1")
_orig_init_as_server = _t.SSLTransport.initAsServer


def _init_as_server(self):
    import socket

    host, port = self.stServerAddress[:2]
    if host not in ("", "0.0.0.0", "::"):
        return _orig_init_as_server(self)
    # DIRAC makes an AF_INET6 socket when it can: an IPv4 address is bound as its mapped form
    candidates = ["::ffff:" + _bind, _bind] if ":" not in _bind else [_bind]
    for i, addr in enumerate(candidates):
        self.stServerAddress = (addr, port)
        try:
            return _orig_init_as_server(self)
        except (socket.gaierror, OSError):
            if i == len(candidates) - 1:
                raise


_t.SSLTransport.initAsServer = _init_as_server

if mode == "service":
    from DIRAC.Core.scripts.dirac_service import main
elif mode == "executor":
    # JobScheduling compares RescheduleDelays from the CS (strings) with ints: make them numbers
    from DIRAC.WorkloadManagementSystem.Executor import JobScheduling as _js

    _orig_get_option = _js.JobScheduling.ex_getOption.__func__

    def _ex_get_option(cls, optName, defaultValue=None):
        value = _orig_get_option(cls, optName, defaultValue)
        if optName == "RescheduleDelays" and isinstance(value, (list, tuple)):
            value = [int(float(v)) for v in value]
        return value

    _js.JobScheduling.ex_getOption = classmethod(_ex_get_option)
    from DIRAC.Core.scripts.dirac_executor import main
else:
    raise SystemExit("mode must be service or executor")
main()
'''

POSTSTART = r'''
"""Post-start checks (written by setup_dirac.py): ping every service, seed the ResourceStatus rows."""
import json
import sys
import time

from DIRAC.Core.Base.Script import Script

Script.parseCommandLine(ignoreErrors=True)

from DIRAC import gConfig  # noqa: E402
from DIRAC.ConfigurationSystem.Client.ConfigurationData import gConfigurationData  # noqa: E402
from DIRAC.Core.Base.Client import Client  # noqa: E402

gConfigurationData.setOptionInCFG("/DIRAC/Security/UseServerCertificate", "true")
urls = json.loads(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
pending = dict(urls)
last = {}
while pending and time.monotonic() < deadline:
    for name, url in list(pending.items()):
        res = Client(url=url).ping()
        if res["OK"]:
            del pending[name]
        else:
            last[name] = res["Message"]
    if pending:
        time.sleep(0.5)
if pending:
    print("NOT ANSWERING: " + ", ".join(f"{n} ({last.get(n)})" for n in pending), flush=True)
    sys.exit(3)
print("all services answer", flush=True)

from DIRAC.ResourceStatusSystem.Client.ResourceStatusClient import ResourceStatusClient  # noqa: E402

rss = ResourceStatusClient()
site, ses = sys.argv[3], sys.argv[4].split(",")
rows = [("Site", site, "all", "Site")]
for se in ses:
    for st in ("ReadAccess", "WriteAccess", "CheckAccess", "RemoveAccess"):
        rows.append(("Resource", se, st, "StorageElement"))
for element, name, status_type, element_type in rows:
    res = rss.addOrModifyStatusElement(
        element, "Status", name=name, statusType=status_type, status="Active", elementType=element_type,
        reason="airlock local test", tokenOwner="rs_svc",
    )
    if not res["OK"]:
        print(f"RSS row {element} {name} {status_type}: {res['Message']}", flush=True)
        sys.exit(4)
print("ResourceStatus rows seeded", flush=True)
'''


def proxy_init(s: Settings, env: dict[str, str], group: str, cert: Path, key: Path, proxy: Path) -> None:
    penv = dict(env, X509_USER_CERT=str(cert), X509_USER_KEY=str(key), X509_USER_PROXY=str(proxy))
    cmd = [str(s.venv / "bin" / "dirac-proxy-init"), "-N", "-g", group, "-v", "24:00", "--out", str(proxy)]
    res = subprocess.run(
        cmd, env=penv, cwd=s.root, text=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if res.returncode or not proxy.exists():
        raise SystemExit(f"dirac-proxy-init -g {group} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def write_helpers(s: Settings) -> None:
    s.bin.mkdir(parents=True, exist_ok=True)
    (s.bin / "dirac_launch.py").write_text(LAUNCHER.lstrip())
    (s.bin / "poststart.py").write_text(POSTSTART.lstrip())


def proc_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "DIRAC"))}
    env.update(s.client_env())
    env.pop("DIRAC_NO_CFG", None)
    env["PATH"] = f"{s.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(s: Settings, name: str, args: list[str]) -> None:
    s.run.mkdir(parents=True, exist_ok=True)
    s.logs.mkdir(parents=True, exist_ok=True)
    logf = open(s.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    cmd = ["timeout", "--signal=TERM", "--kill-after=10", str(s.lifetime), str(s.python),
           str(s.bin / "dirac_launch.py"), *args]  # fmt: skip
    p = subprocess.Popen(
        cmd, cwd=s.root, env=proc_env(s), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    logf.close()
    (s.run / f"{name}.pid").write_text(f"{p.pid}\n")
    log(f"started {name} (pid {p.pid}, log {s.logs / (name + '.log')})")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_ports(s: Settings, services: list[tuple[str, str, int]], procs: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = {name: s.port(off) for _sys, name, off in services}
    while waiting:
        waiting = {n: p for n, p in waiting.items() if not port_open(p)}
        if not waiting:
            return
        for proc in procs:
            pid = read_pid(s, proc)
            if pid is None or not alive(pid):
                tail = (s.logs / f"{proc}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{proc} exited during start-up; log tail:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"services not listening after {timeout:.0f}s: {sorted(waiting)}; see {s.logs}")
        time.sleep(0.3)


def read_pid(s: Settings, name: str) -> int | None:
    try:
        return int((s.run / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def ours(s: Settings, pid: int) -> bool:
    """The pid still runs our launcher in this DIR (never signal a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(s.bin / "dirac_launch.py").encode() in cmdline


def stop_all(s: Settings) -> None:
    if not s.run.exists():
        return
    pids = {}
    for pidfile in sorted(s.run.glob("*.pid")):
        pid = read_pid(s, pidfile.stem)
        if pid is not None and alive(pid) and ours(s, pid):
            pids[pidfile.stem] = pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        pidfile.unlink()
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for name, pid in pids.items():
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        log(f"stopped {name} (pid {pid})")


# ---------------------------------------------------------------- main


def write_env(s: Settings) -> Path:
    env = s.client_env()
    env.pop("DIRAC_NO_CFG", None)
    lines = [f"export {k}={v}" for k, v in env.items()]
    lines.append(f"export PATH={s.venv / 'bin'}:$PATH")
    lines.append(f"export X509_USER_PROXY={s.users / USER / 'proxy.pem'}")
    path = s.root / "env.sh"
    path.write_text(
        "# source me: the environment of a DIRAC client of this local server\n" + "\n".join(lines) + "\n"
    )
    info = {
        "root": str(s.root),
        "python": str(s.python),
        "env": env,
        "alice_proxy": str(s.alice_proxy),
        "gateway_proxy": str(s.gateway_proxy),
        "ports": {name: s.port(off) for _sys, name, off in WMS_SERVICES + DMS_SERVICES},
        "db_prefix": s.prefix,
        "site": SITE,
        "ce": CE,
        "queue": QUEUE,
        "se": SE,
        "vo": VO,
        "user": USER,
        "user_group": USER_GROUP,
    }
    (s.root / "dirac.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def up(root: Path) -> None:
    s = Settings(root)
    s.root.mkdir(parents=True, exist_ok=True)
    ensure_apt()
    ensure_mysql_up(s)
    stop_all(s)
    busy = [name for _s, name, off in WMS_SERVICES + DMS_SERVICES if port_open(s.port(off))]
    if busy:
        raise SystemExit(
            f"ports of {busy} (base {s.port_base}) are in use by something else; set AIRLOCK_DIRAC_PORT_BASE"
        )
    ensure_venv(s)
    pkg = dirac_pkg(s)
    ensure_certs(s)
    s.etc.mkdir(parents=True, exist_ok=True)
    s.cfg.write_text(cfg_text(s))
    for d in ("sandboxes", "se"):
        path = s.storage / d
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    create_databases(s, pkg)
    write_helpers(s)
    for f in s.logs.glob("*.log") if s.logs.exists() else []:
        f.unlink()

    log("starting services (first start creates the task-queue and sandbox tables; executors wait for it)")
    start(s, "wms", ["service", *[f"{sy}/{n}" for sy, n, _o in WMS_SERVICES]])
    start(s, "dms", ["service", *[f"{sy}/{n}" for sy, n, _o in DMS_SERVICES]])
    wait_ports(s, WMS_SERVICES + DMS_SERVICES, ["wms", "dms"], timeout=180)
    log("all service ports listen")

    urls = {n: f"dips://localhost:{s.port(o)}/{sy}/{n}" for sy, n, o in WMS_SERVICES + DMS_SERVICES}
    env = proc_env(s)
    res = subprocess.run(
        [str(s.python), str(s.bin / "poststart.py"), json.dumps(urls), "120", SITE, f"{SE},{SANDBOX_SE}"],
        env=env, cwd=s.root, text=True, capture_output=True, timeout=300,
    )  # fmt: skip
    if res.returncode:
        raise SystemExit(f"post-start checks failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    log(res.stdout.strip().replace("\n", "; "))
    # only now: an executor that connects to OptimizationMind while the port is open but the service
    # not yet answering exits ("peer did not return certificate")
    start(s, "optimizers", ["executor", "WorkloadManagement/Optimizers"])

    # dirac-proxy-init works offline (-N: no ProxyManager upload; DiracX disabled for the VO)
    for who, group, cert, key, proxy in (
        (USER, USER_GROUP, s.users / USER / "usercert.pem", s.users / USER / "userkey.pem", s.alice_proxy),
        ("gateway", PILOT_GROUP, s.gateway / "cert.pem", s.gateway / "key.pem", s.gateway_proxy),
    ):
        proxy_init(s, env, group, cert, key, proxy)
        log(f"dirac-proxy-init -g {group} for {who}: {proxy}")

    # the optimizers must be connected to OptimizationMind before a submitted job moves on
    deadline = time.monotonic() + 30
    optlog = s.logs / "optimizers.log"
    while time.monotonic() < deadline:
        text = optlog.read_text(errors="replace") if optlog.exists() else ""
        if "Connected to" in text or "connected to" in text:
            break
        pid = read_pid(s, "optimizers")
        if pid is None or not alive(pid):
            raise SystemExit(f"optimizers exited; log tail:\n{text[-3000:]}")
        time.sleep(0.5)
    else:
        log("warning: no 'Connected to' line in optimizers.log yet")
    envsh = write_env(s)
    log(f"DIRAC {DIRAC_VERSION} is up in {s.root}")
    print(f"source {envsh}")


def down(root: Path) -> None:
    s = Settings(root)
    stop_all(s)
    left = [f"{n}:{s.port(o)}" for _s, n, o in WMS_SERVICES + DMS_SERVICES if port_open(s.port(o))]
    if left:
        print(f"warning: still listening (not started by this DIR?): {left}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        raise SystemExit("usage: setup_dirac.py up|down DIR")
    (up if sys.argv[1] == "up" else down)(Path(sys.argv[2]))


if __name__ == "__main__":
    main()
