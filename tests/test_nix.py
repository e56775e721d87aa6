"""Offline checks of the Nix packaging: flake.nix and nix/.

The real nixpkgs cannot be fetched here, so the flake is evaluated against a small stub
kept in nix/tests/stub-nixpkgs (lib functions, python3Packages whose callPackage passes
only the arguments asked for, formats.toml with a pure-Nix TOML writer, a module
evaluator). Every test needs the `nix` command and skips itself without it; each takes
about a second. The flake only sees git-tracked files: `git add` new Nix files first.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "nix" / "tests" / "stub-nixpkgs"
SYSTEM = "x86_64-linux"
STUB_FLAGS = [
    "--offline",
    "--no-write-lock-file",
    "--override-input",
    "nixpkgs",
    "path:./nix/tests/stub-nixpkgs",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    extra = "experimental-features = nix-command flakes"
    env["NIX_CONFIG"] = f"{env['NIX_CONFIG']}\n{extra}" if env.get("NIX_CONFIG") else extra
    return env


@pytest.fixture
def nix() -> str:
    exe = shutil.which("nix")
    if exe is None:
        pytest.skip("the `nix` command is not installed (apt-get install nix-bin); Nix packaging not checked")
    if not (ROOT / "flake.nix").is_file() or not STUB.is_dir():
        pytest.skip("flake.nix or nix/tests/stub-nixpkgs is not here (not a source checkout)")
    return exe


def require_tracked_readme() -> None:
    """The package's source is a fileset that includes pyproject.toml's `readme`
    (hatchling needs it to build); flakes only see git-tracked files."""
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if not isinstance(readme, str) or not (ROOT / ".git").exists():
        return
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", readme], cwd=ROOT, capture_output=True)
    if tracked.returncode != 0:
        pytest.fail(f"{readme} (pyproject.toml's readme) must exist and be tracked by git: the Nix build needs it")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{shlex.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def nix_eval_flake(attr: str, apply: str | None = None, *, impure: bool = False) -> object:
    args = ["nix", "eval", "--json", *STUB_FLAGS]
    if impure:
        args.append("--impure")
    args.append(f".#{attr}")
    if apply:
        args += ["--apply", apply]
    return json.loads(run(*args).stdout)


def nix_eval_expr(expr: str) -> object:
    return json.loads(run("nix", "eval", "--json", "--impure", "--expr", expr).stdout)


def nix_str(s: str) -> str:
    """A Nix double-quoted string literal for s (printable text, \\n, \\t, \\r)."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return '"' + out.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


def pep503(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return pep503(re.split(r"[\s\[<>=!~;@(]", req.strip(), maxsplit=1)[0])


# 1 -------------------------------------------------------------------------------


def test_every_nix_file_parses(nix: str) -> None:
    files = sorted(p for p in ROOT.rglob("*.nix") if ".git" not in p.relative_to(ROOT).parts)
    assert ROOT / "flake.nix" in files
    for f in files:
        proc = run("nix-instantiate", "--parse", str(f), check=False)
        assert proc.returncode == 0, f"{f.relative_to(ROOT)} does not parse:\n{proc.stderr}"


# 2 -------------------------------------------------------------------------------


def test_flake_check_against_stub_nixpkgs(nix: str) -> None:
    require_tracked_readme()
    # Evaluates packages, apps, devShells, overlays, formatter, checks (including the
    # NixOS VM test, whose nodes go through the stub module evaluator) for both systems.
    run("nix", "flake", "check", "--no-build", *STUB_FLAGS)
    shown = nix_eval_flake("apps", "apps: builtins.mapAttrs (s: a: a.default.program) apps")
    for system in ("x86_64-linux", "aarch64-linux"):
        assert shown[system].endswith("/bin/task-pipeline")
    overlay = nix_eval_flake(
        "overlays",
        f"""o: let
              stub = import {STUB}/pkgs.nix {{ lib = import {STUB}/lib.nix; system = "{SYSTEM}"; }};
              final = stub // o.default final stub;
            in final.task-pipeline.pname""",
        impure=True,
    )
    assert overlay == "task-pipeline"


# 3 -------------------------------------------------------------------------------


def test_nix_dependencies_match_pyproject(nix: str) -> None:
    require_tracked_readme()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    # the Nix package includes the PostgreSQL and web extras (withPostgres, withWeb default to
    # true) and the S3 extra (withS3 defaults to true where nixpkgs has obstore, as the stub does)
    base = [requirement_name(d) for d in project["dependencies"] + extras["postgres"] + extras["web"]]
    wanted = sorted(base + [requirement_name(d) for d in extras["s3"]])

    pkg = nix_eval_flake(
        f"packages.{SYSTEM}.default",
        """p: {
             inherit (p) pname version stubDependencyNames;
             buildSystem = map (d: d.pname) p.stubArgs.build-system;
             checkInputs = map (d: d.pname) p.stubArgs.nativeCheckInputs;
             imports = p.stubArgs.pythonImportsCheck;
             mainProgram = p.meta.mainProgram;
             pyproject = p.stubArgs.pyproject;
           }""",
    )
    assert sorted(pep503(n) for n in pkg["stubDependencyNames"]) == wanted
    assert pkg["pname"] == project["name"]
    assert pkg["version"] == project["version"]
    assert pkg["mainProgram"] in project["scripts"]
    assert pkg["pyproject"] is True
    assert sorted(pkg["buildSystem"]) == sorted(requirement_name(r) for r in pyproject["build-system"]["requires"])
    assert "pytestCheckHook" in pkg["checkInputs"] and "hypothesis" in pkg["checkInputs"]
    assert pkg["imports"] == ["task_pipeline"]

    shell = nix_eval_flake(
        f"devShells.{SYSTEM}.default",
        "s: builtins.concatMap (p: p.stubPackageNames or [ p.pname ]) s.stubArgs.packages",
    )
    missing = set(wanted) - {pep503(n) for n in shell}
    assert not missing, f"devShell lacks {missing}"
    assert {"pytest", "hypothesis", "ruff"} <= set(shell)

    # a nixpkgs without python3Packages.obstore: the package still evaluates, without the
    # S3 extra, unless withS3 is asked for, which says why it cannot be had
    without = nix_eval_expr(f"""
      let
        stub = import {STUB}/pkgs.nix {{ lib = import {STUB}/lib.nix; system = "{SYSTEM}"; }};
        f = import {ROOT}/nix/package.nix;
        # callPackage over a scope that lacks obstore
        scope = builtins.removeAttrs stub.python3Packages [ "obstore" ];
        call = extra: f (builtins.intersectAttrs (builtins.functionArgs f) scope // extra);
        forced = builtins.tryEval (builtins.deepSeq (call {{ withS3 = true; }}).stubDependencyNames true);
      in {{
        deps = (call {{ }}).stubDependencyNames;
        extras = builtins.attrNames (call {{ }}).stubArgs.optional-dependencies;
        forced = forced.success;
        noPostgres = (call {{ withPostgres = false; }}).stubDependencyNames;
        noWeb = (call {{ withWeb = false; }}).stubDependencyNames;
        # with obstore at hand, withS3 = false leaves it out
        noS3 = (stub.python3Packages.callPackage {ROOT}/nix/package.nix {{ withS3 = false; }}).stubDependencyNames;
      }}""")
    assert sorted(pep503(n) for n in without["deps"]) == sorted(base)
    assert without["extras"] == ["postgres", "web"]
    assert without["forced"] is False
    assert sorted(pep503(n) for n in without["noPostgres"]) == sorted(
        requirement_name(d) for d in project["dependencies"] + extras["web"])
    assert sorted(pep503(n) for n in without["noWeb"]) == sorted(
        requirement_name(d) for d in project["dependencies"] + extras["postgres"])
    assert sorted(pep503(n) for n in without["noS3"]) == sorted(base)


# 4 -------------------------------------------------------------------------------

MODULE_PRELUDE = """
let
  lib = import STUB/lib.nix;
  system = "x86_64-linux";
  self.packages.${system}.default = derivation {
    name = "task-pipeline-0.1.0"; inherit system; builder = "/bin/sh";
  } // { meta.mainProgram = "task-pipeline"; };
  module = import ROOT/nix/module.nix { inherit self; };
  # cfg: services.task-pipeline; extra: the rest of the user's configuration, merged
  # with the module's config (priorities, mkIf) by the stub evaluator
  evalWith = cfg: extra: import STUB/eval-module.nix {
    inherit lib system module;
    config = extra // { services.task-pipeline = cfg; };
  };
  eval = cfg: evalWith cfg { };
  ok = cfg: let e = eval cfg; in { inherit (e) config failedAssertions; };
  okWith = cfg: extra: let e = evalWith cfg extra; in { inherit (e) config failedAssertions; };
  unit = cfg: extra: (evalWith cfg extra).config.systemd.services.task-pipeline;
  asserts = cfg: (eval cfg).failedAssertions;
  fails = cfg: !(builtins.tryEval (eval cfg).check).success;
  failsWith = cfg: extra: !(builtins.tryEval (evalWith cfg extra).check).success;
"""

MODULE_EXPR = MODULE_PRELUDE + """
  custom = {
    enable = true;
    stateDir = "/srv/task pipeline";
    parallel = 3;
    extraArgs = [ "-verbose" "it's" ];
    user = "task-pipeline";
    environment.LANG = "C.UTF-8";
    settings.step = [ { name = "upper"; script = "tr a-z A-Z < $INPUT_FILE > $OUTPUT_DIR/done"; } ];
  };
in {
  basic = ok { enable = true; manifest = "/srv/pipeline/manifest.toml"; };
  custom = ok custom;
  customManifest = builtins.readFile
    (eval custom).config.environment.etc."task-pipeline/manifest.toml".source;
  disabled = ok { manifest = "/srv/m.toml"; parallel = 2; };
  nothing = ok { };
  both = asserts { enable = true; manifest = "/srv/m.toml"; settings.step = [ ]; };
  neither = asserts { enable = true; };
  dynamicOutsideVarLib = asserts { enable = true; manifest = "/srv/m.toml"; stateDir = "/srv/db"; };
  badParallel = fails { enable = true; manifest = "/srv/m.toml"; parallel = 0; };
  badManifest = fails { enable = true; manifest = 3; };
  misspelt = fails { enable = true; manifest = "/srv/m.toml"; paralel = 2; };
  good = fails { enable = true; manifest = "/srv/m.toml"; };
}
"""


def test_nixos_module(nix: str) -> None:
    r = nix_eval_expr(MODULE_EXPR.replace("STUB", str(STUB)).replace("ROOT", str(ROOT)))

    basic = r["basic"]
    assert basic["failedAssertions"] == []
    svc = basic["config"]["systemd"]["services"]["task-pipeline"]
    sc = svc["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[0].endswith("/bin/task-pipeline")
    assert argv[1:] == ["serve", "-manifest", "/srv/pipeline/manifest.toml", "-db", "/var/lib/task-pipeline"]
    assert svc["wantedBy"] == ["multi-user.target"]
    assert sc["ExecReload"].endswith("kill -HUP $MAINPID")
    assert sc["Restart"] == "on-failure"
    assert sc["DynamicUser"] is True and "User" not in sc
    assert sc["StateDirectory"] == "task-pipeline"
    assert sc["WorkingDirectory"] == "/var/lib/task-pipeline"
    assert "ReadWritePaths" not in sc
    assert sc["ProtectSystem"] == "strict"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices",
                "ProtectKernelTunables", "ProtectControlGroups", "RestrictSUIDSGID"):
        assert sc[key] is True, key
    assert sc["SystemCallFilter"][0] == "@system-service"
    assert any(p.endswith("-bash") for p in svc["path"]), "sh must be on the scripts' PATH"
    assert basic["config"]["environment"]["systemPackages"], "the CLI should be installed"

    custom = r["custom"]
    assert custom["failedAssertions"] == []
    svc = custom["config"]["systemd"]["services"]["task-pipeline"]
    sc = svc["serviceConfig"]
    assert shlex.split(sc["ExecStart"])[1:] == [
        "serve", "-manifest", "/etc/task-pipeline/manifest.toml", "-db", "/srv/task pipeline",
        "-parallel", "3", "-verbose", "it's",
    ]
    assert sc["DynamicUser"] is False and sc["User"] == "task-pipeline" and sc["Group"] == "task-pipeline"
    assert sc["ReadWritePaths"] == ["/srv/task pipeline"] and "StateDirectory" not in sc
    assert svc["environment"] == {"LANG": "C.UTF-8"}
    users = custom["config"]["users"]
    assert users["users"]["task-pipeline"]["isSystemUser"] is True
    assert "task-pipeline" in users["groups"]
    assert custom["config"]["systemd"]["tmpfiles"]["rules"] == ["d /srv/task pipeline 0750 task-pipeline task-pipeline - -"]
    generated = custom["config"]["environment"]["etc"]["task-pipeline/manifest.toml"]["source"]
    assert svc["reloadTriggers"] == [generated]
    manifest = tomllib.loads(r["customManifest"])
    assert manifest["pipeline"]["workdir"] == "/srv/task pipeline"
    assert manifest["step"][0]["name"] == "upper"

    assert r["disabled"]["config"] == {}
    assert r["nothing"]["config"] == {}
    assert any("exactly one" in m for m in r["both"])
    assert any("exactly one" in m for m in r["neither"])
    assert any("needs `user`" in m for m in r["dynamicOutsideVarLib"])
    assert r["badParallel"] and r["badManifest"] and r["misspelt"]
    assert r["good"] is False


# 4b: hardening, and how a user relaxes it ------------------------------------------

# What issue "Store safety" (item 13) asks of the unit, on top of the settings above.
HARDENING = {
    "ProtectKernelLogs": True,
    "ProtectClock": True,
    "ProtectHostname": True,
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictNamespaces": True,
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "MemoryDenyWriteExecute": True,
    "SystemCallFilter": ["@system-service", "~@privileged @resources"],
}
# settings that predate it, which must be just as easy to relax
OLDER_HARDENING = [
    "NoNewPrivileges", "PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID",
    "RestrictRealtime", "LockPersonality", "SystemCallArchitectures", "SystemCallErrorNumber",
]


def _user_value(value: object) -> object:
    """A value no default has: what a user's plain definition sets."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return ["user-choice"]
    return "user-choice"


def _nix_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return nix_str(value)
    if isinstance(value, list):
        return "[ " + " ".join(_nix_value(v) for v in value) + " ]"
    raise TypeError(value)


def test_nixos_module_hardening_and_overrides(nix: str) -> None:
    keys = list(HARDENING) + OLDER_HARDENING
    base = nix_eval_expr(
        MODULE_PRELUDE.replace("STUB", str(STUB)).replace("ROOT", str(ROOT))
        + 'in unit { enable = true; manifest = "/srv/m.toml"; } { }'
    )
    sc = base["serviceConfig"]
    for key, value in HARDENING.items():
        assert sc.get(key) == value, (key, sc.get(key))
    assert sc["SystemCallErrorNumber"] == "EPERM"  # a filtered call fails, it does not kill the script

    # every hardening key, set by the user with a plain definition, wins over the module's
    user = {k: _user_value(sc[k]) for k in keys}
    user_nix = "{ " + " ".join(f"{k} = {_nix_value(v)};" for k, v in user.items()) + " }"
    expr = MODULE_PRELUDE + f"""
      cfg = {{ enable = true; manifest = "/srv/m.toml"; }};
      plain = {{ systemd.services.task-pipeline.serviceConfig = {user_nix}; }};
    in {{
      relaxed = (unit cfg plain).serviceConfig;
      # the README's examples
      jit = (unit cfg {{ systemd.services.task-pipeline.serviceConfig.MemoryDenyWriteExecute = false; }}).serviceConfig;
      nice = (unit cfg {{
        systemd.services.task-pipeline.serviceConfig.SystemCallFilter = [ "@system-service" "~@privileged" ];
      }}).serviceConfig;
      option = (unit (cfg // {{ memoryDenyWriteExecute = false; }}) {{ }}).serviceConfig;
      forced = (unit cfg {{
        systemd.services.task-pipeline.serviceConfig.RestrictAddressFamilies = lib.mkForce [ "AF_UNIX" "AF_NETLINK" ];
      }}).serviceConfig;
      limit = (unit cfg {{ systemd.services.task-pipeline.unitConfig.StartLimitBurst = 3; }}).unitConfig;
      # the stub merges like NixOS: two plain values of one key conflict
      conflict = failsWith cfg {{ systemd.services.task-pipeline.serviceConfig.KillMode = "process"; }};
      forcedKillMode = (unit cfg {{
        systemd.services.task-pipeline.serviceConfig.KillMode = lib.mkForce "process";
      }}).serviceConfig.KillMode;
    }}"""
    r = nix_eval_expr(expr.replace("STUB", str(STUB)).replace("ROOT", str(ROOT)))
    for key in keys:
        assert r["relaxed"][key] == user[key], (key, r["relaxed"][key])
    assert r["relaxed"]["ExecStart"] == sc["ExecStart"]  # the rest is untouched
    assert r["jit"]["MemoryDenyWriteExecute"] is False
    assert r["jit"]["SystemCallFilter"] == HARDENING["SystemCallFilter"]
    assert r["nice"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert r["nice"]["MemoryDenyWriteExecute"] is True
    assert r["option"]["MemoryDenyWriteExecute"] is False
    assert r["forced"]["RestrictAddressFamilies"] == ["AF_UNIX", "AF_NETLINK"]
    assert r["limit"]["StartLimitBurst"] == 3
    assert r["conflict"] is True
    assert r["forcedKillMode"] == "process"


# 4c: restarts, ordering, secrets, the shared PostgreSQL store ---------------------

POSTGRES_EXPR = MODULE_PRELUDE + """
  url = "postgresql://tp@db.example.org:5432/tp";
  pg = {
    enable = true;
    manifest = "/srv/m.toml";
    user = "task-pipeline";
    database.url = url;
    database.passwordFile = "/run/secrets/tp-db-password";
    objects = "/mnt/objects";
  };
  sqlite = { enable = true; manifest = "/srv/m.toml"; };
in {
  sqlite = ok (sqlite // { environmentFile = "/run/secrets/tp.env"; environment.LANG = "C"; });
  pg = ok pg;
  pgScratch = ok (pg // { scratchDir = "/var/cache/tp scratch"; parallel = 2; });
  pgLocal = ok (pg // { database.url = "postgresql://tp@localhost/tp"; });
  pgSocket = ok (pg // { database.url = "postgres:///tp?host=/run/postgresql"; });
  pgIPv6 = ok (pg // { database.url = "postgresql://tp@[::1]:5432/tp"; });
  pgLoopback = ok (pg // { database.url = "postgres://127.0.0.1/tp"; });
  pgPercent = ok (pg // { database.url = "postgresql://tp@db/tp?options=-c%20x"; });
  pgObjectsInState = ok (pg // { objects = "/var/lib/task-pipeline/objects"; user = null; });
  sqliteObjects = ok (sqlite // { objects = "/srv/objects"; user = "task-pipeline"; });
  noObjects = asserts (builtins.removeAttrs pg [ "objects" ]);
  passwordInUrl = asserts (pg // { database.url = "postgresql://tp:hunter2@db/tp"; });
  passwordInQuery = asserts (pg // { database.url = "postgresql://tp@db/tp?password=hunter2"; });
  notPostgres = asserts (pg // { database.url = "mysql://tp@db/tp"; });
  passwordInStore = asserts (pg // { database.passwordFile = "${builtins.storeDir}/abc-pw"; });
  passwordNixPath = fails (pg // { database.passwordFile = ./.; });
  passwordWithoutUrl = asserts (sqlite // { database.passwordFile = "/run/secrets/pw"; });
  envFileInStore = asserts (sqlite // { environmentFile = "${builtins.storeDir}/abc-env"; });
  envFileRelative = asserts (sqlite // { environmentFile = "secrets.env"; });
  envFileNixPath = fails (sqlite // { environmentFile = ./.; });
  relativeObjects = asserts (pg // { objects = "objects"; });
  s3Objects = ok (pg // { objects = "s3://bucket/prefix"; });
  dynamicObjects = asserts (pg // { user = null; });
  dynamicScratch = asserts (sqlite // { scratchDir = "/srv/scratch"; });
}
"""


def test_nixos_module_restarts_and_secrets(nix: str) -> None:
    r = nix_eval_expr(POSTGRES_EXPR.replace("STUB", str(STUB)).replace("ROOT", str(ROOT)))

    sqlite = r["sqlite"]
    assert sqlite["failedAssertions"] == []
    svc = sqlite["config"]["systemd"]["services"]["task-pipeline"]
    sc = svc["serviceConfig"]
    # exit 2 (usage, manifest) and 3 (store error) cannot be fixed by restarting
    assert sc["Restart"] == "on-failure"
    assert sorted(sc["RestartPreventExitStatus"]) == [2, 3]
    # and whatever else keeps failing stops: a start limit, reachable with the backoff
    unit = svc["unitConfig"]
    interval, burst = unit["StartLimitIntervalSec"], unit["StartLimitBurst"]
    assert isinstance(burst, int) and burst >= 2 and isinstance(interval, int) and interval > 0
    assert sc["RestartMaxDelaySec"] * (burst - 1) < interval, "the restart delay outruns the start limit"
    assert "network-online.target" in svc["wants"] and "network-online.target" in svc["after"]
    assert "postgresql.service" not in svc["after"] + svc["wants"]
    # secrets go in a file that systemd reads; the environment stays as given
    assert sc["EnvironmentFile"] == "/run/secrets/tp.env"
    assert svc["environment"] == {"LANG": "C"}
    assert "LoadCredential" not in sc and "RequiresMountsFor" not in unit
    assert "--objects" not in sc["ExecStart"] and "--scratch" not in sc["ExecStart"]

    pg = r["pg"]
    assert pg["failedAssertions"] == []
    svc = pg["config"]["systemd"]["services"]["task-pipeline"]
    sc = svc["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[1:] == [
        "serve", "-manifest", "/srv/m.toml", "-db", "postgresql://tp@db.example.org:5432/tp",
        "--objects", "/mnt/objects", "--scratch", "/var/lib/task-pipeline/tmp",
    ]
    assert sc["LoadCredential"] == ["db-password:/run/secrets/tp-db-password"]
    assert svc["environment"] == {"TASK_PIPELINE_DB_PASSWORD_FILE": "%d/db-password"}
    assert not any("/run/secrets/tp-db-password" in v for v in svc["environment"].values())
    assert "/run/secrets/tp-db-password" not in sc["ExecStart"]
    assert sc["ReadWritePaths"] == ["/mnt/objects"]
    assert svc["unitConfig"]["RequiresMountsFor"] == ["/mnt/objects"]
    assert sc["StateDirectory"] == "task-pipeline" and sc["WorkingDirectory"] == "/var/lib/task-pipeline"
    # a lost connection (exit 3 too) passes: retried, within the start limit
    assert sc["RestartPreventExitStatus"] == [2]
    assert "network-online.target" in svc["wants"] and "network-online.target" in svc["after"]
    assert "postgresql.service" not in svc["after"] + svc["wants"], "the database is on another host"

    sc = r["pgScratch"]["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[argv.index("--scratch") + 1] == "/var/cache/tp scratch"
    assert argv[-2:] == ["-parallel", "2"]
    assert sc["ReadWritePaths"] == ["/mnt/objects", "/var/cache/tp scratch"]
    assert r["pgScratch"]["config"]["systemd"]["tmpfiles"]["rules"] == [
        "d /var/cache/tp scratch 0750 task-pipeline task-pipeline - -"
    ]

    for local in ("pgLocal", "pgSocket", "pgIPv6", "pgLoopback"):
        svc = r[local]["config"]["systemd"]["services"]["task-pipeline"]
        assert r[local]["failedAssertions"] == [], local
        assert "postgresql.service" in svc["after"] and "postgresql.service" in svc["wants"], local
        assert "network-online.target" in svc["after"], local

    # systemd would expand %2 itself: the URL reaches the daemon as written
    start = r["pgPercent"]["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]["ExecStart"]
    assert "options=-c%%20x" in start and re.search("(?<!%)%20", start) is None

    # objects in the state directory: nothing to add, and a DynamicUser is fine
    assert r["pgObjectsInState"]["failedAssertions"] == []
    sc = r["pgObjectsInState"]["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]
    assert "ReadWritePaths" not in sc and sc["DynamicUser"] is True
    # objects elsewhere with the SQLite store
    sc = r["sqliteObjects"]["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[argv.index("-db") + 1] == "/var/lib/task-pipeline"
    assert argv[argv.index("--objects") + 1] == "/srv/objects" and "--scratch" not in argv
    assert sc["ReadWritePaths"] == ["/srv/objects"]

    assert any("needs `objects`" in m for m in r["noObjects"])
    assert any("must not contain a password" in m for m in r["passwordInUrl"])
    assert any("must not contain a password" in m for m in r["passwordInQuery"])
    assert any("postgresql://" in m for m in r["notPostgres"])
    assert any("outside the Nix store" in m for m in r["passwordInStore"])
    assert r["passwordNixPath"] is True  # a Nix path would be copied to the store
    assert any("needs database.url" in m for m in r["passwordWithoutUrl"])
    assert any("outside the Nix store" in m for m in r["envFileInStore"])
    assert any("outside the Nix store" in m for m in r["envFileRelative"])
    assert r["envFileNixPath"] is True
    assert any("absolute path or an S3 bucket" in m for m in r["relativeObjects"])
    assert r["s3Objects"]["failedAssertions"] == []
    sc = r["s3Objects"]["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]
    assert "ReadWritePaths" not in sc and "s3://bucket/prefix" in shlex.split(sc["ExecStart"])
    assert any("need `user`" in m for m in r["dynamicObjects"])
    assert any("needs `user`" in m for m in r["dynamicScratch"])


# 4d: objects in an S3 bucket -------------------------------------------------------

S3_EXPR = MODULE_PRELUDE + """
  bucket = "s3://tp-objects/worker";
  s3 = {
    enable = true;
    manifest = "/srv/m.toml";
    objects = bucket;
    s3.credentialsFile = "/run/secrets/tp-s3";
    s3.endpoint = "https://s3.example.org";
    s3.region = "eu-central-1";
    cacheSize = "10G";
    environment.LANG = "C";
  };
  sqlite = { enable = true; manifest = "/srv/m.toml"; };
  pg = s3 // {
    database.url = "postgresql://tp@db.example.org/tp";
    database.passwordFile = "/run/secrets/tp-db-password";
  };
in {
  s3 = ok s3;
  pg = ok pg;
  bare = ok (sqlite // { objects = "s3://tp-objects"; });
  # the README's worker with a bucket: a system user, a Garage endpoint
  readme = ok (pg // { user = "task-pipeline"; s3.region = "garage"; cacheSize = "20G"; });
  credsInStore = asserts (s3 // { s3.credentialsFile = "${builtins.storeDir}/abc-aws"; });
  credsRelative = asserts (s3 // { s3.credentialsFile = "aws-credentials"; });
  credsNixPath = fails (s3 // { s3.credentialsFile = ./.; });
  cacheWithoutS3 = asserts (sqlite // { cacheSize = "10G"; });
  cacheWithDirectory = asserts (sqlite // { objects = "/srv/objects"; user = "tp"; cacheSize = "10G"; });
  cacheNotASize = fails (s3 // { cacheSize = "ten gigabytes"; });
  cacheSizes = map (c: (ok (s3 // { cacheSize = c; })).failedAssertions) [ "500M" "1.5GiB" "2T" "1048576" "10gb" ];
  endpointWithoutS3 = asserts (sqlite // { s3.endpoint = "https://s3.example.org"; });
  credsWithoutS3 = asserts (sqlite // { objects = "/srv/objects"; user = "tp"; s3.credentialsFile = "/run/secrets/aws"; });
  otherScheme = asserts (sqlite // { objects = "gs://tp-objects/worker"; });
  noBucket = asserts (sqlite // { objects = "s3://"; });
  misspelt = fails (s3 // { s3.endpiont = "https://s3.example.org"; });
}
"""


def test_nixos_module_objects_in_a_bucket(nix: str) -> None:
    r = nix_eval_expr(S3_EXPR.replace("STUB", str(STUB)).replace("ROOT", str(ROOT)))

    s3 = r["s3"]
    assert s3["failedAssertions"] == []
    svc = s3["config"]["systemd"]["services"]["task-pipeline"]
    sc = svc["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[1:] == [
        "serve", "-manifest", "/srv/m.toml", "-db", "/var/lib/task-pipeline",
        "--objects", "s3://tp-objects/worker", "--cache-size", "10G",
    ]
    # the credentials file: read by systemd, handed over in the credentials directory
    assert sc["LoadCredential"] == ["aws-credentials:/run/secrets/tp-s3"]
    assert svc["environment"] == {
        "LANG": "C",
        "AWS_SHARED_CREDENTIALS_FILE": "%d/aws-credentials",
        "AWS_ENDPOINT_URL": "https://s3.example.org",
        "AWS_REGION": "eu-central-1",
    }
    assert not any("/run/secrets/tp-s3" in v for v in svc["environment"].values())
    assert "/run/secrets/tp-s3" not in sc["ExecStart"]
    # nothing local to make writable or to wait for; a DynamicUser is fine
    assert "ReadWritePaths" not in sc and "RequiresMountsFor" not in svc["unitConfig"]
    assert sc["DynamicUser"] is True and sc["StateDirectory"] == "task-pipeline"
    # a bucket not reachable yet (exit 3) may come back: retried within the start limit
    assert sc["RestartPreventExitStatus"] == [2]
    assert "network-online.target" in svc["wants"] and "network-online.target" in svc["after"]

    pg = r["pg"]
    assert pg["failedAssertions"] == []
    svc = pg["config"]["systemd"]["services"]["task-pipeline"]
    sc = svc["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[1:] == [
        "serve", "-manifest", "/srv/m.toml", "-db", "postgresql://tp@db.example.org/tp",
        "--objects", "s3://tp-objects/worker", "--cache-size", "10G", "--scratch", "/var/lib/task-pipeline/tmp",
    ]
    assert sorted(sc["LoadCredential"]) == ["aws-credentials:/run/secrets/tp-s3",
                                            "db-password:/run/secrets/tp-db-password"]
    assert svc["environment"]["TASK_PIPELINE_DB_PASSWORD_FILE"] == "%d/db-password"
    assert svc["environment"]["AWS_SHARED_CREDENTIALS_FILE"] == "%d/aws-credentials"
    assert "ReadWritePaths" not in sc

    readme = r["readme"]
    assert readme["failedAssertions"] == []
    sc = readme["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]
    assert sc["User"] == "task-pipeline" and sc["DynamicUser"] is False and "ReadWritePaths" not in sc
    assert shlex.split(sc["ExecStart"])[8:10] == ["--cache-size", "20G"]

    # a bucket alone: the keys from the environment (environmentFile), AWS's endpoint
    bare = r["bare"]
    assert bare["failedAssertions"] == []
    svc = bare["config"]["systemd"]["services"]["task-pipeline"]
    assert shlex.split(svc["serviceConfig"]["ExecStart"])[-2:] == ["--objects", "s3://tp-objects"]
    assert svc["environment"] == {} and "LoadCredential" not in svc["serviceConfig"]

    for case in ("credsInStore", "credsRelative"):
        assert any("s3.credentialsFile must be an absolute path outside the Nix store" in m for m in r[case]), case
    assert r["credsNixPath"] is True  # a Nix path would be copied to the store
    for case in ("cacheWithoutS3", "cacheWithDirectory"):
        assert any("cacheSize is for objects in a bucket" in m for m in r[case]), case
    assert r["cacheNotASize"] is True
    assert r["cacheSizes"] == [[]] * 5
    for case in ("endpointWithoutS3", "credsWithoutS3"):
        assert any("are for objects in a bucket" in m for m in r[case]), case
    for case in ("otherScheme", "noBucket"):
        assert any("absolute path or an S3 bucket" in m for m in r[case]), case
    assert r["misspelt"] is True


# 4e: serve --http: the address, its token, the firewall ------------------------------

HTTP_EXPR = MODULE_PRELUDE + """
  base = { enable = true; manifest = "/srv/m.toml"; };
  pg = base // {
    database.url = "postgresql://tp@db.example.org/tp";
    database.passwordFile = "/run/secrets/tp-db";
    objects = "s3://bucket/tp";
  };
  token = "/run/secrets/tp-http-token";
in {
  off = ok base;
  loopback = ok (base // { http.listen = "127.0.0.1:8080"; });
  v6loopback = ok (base // { http.listen = "[::1]:8080"; });
  public = ok (pg // { http.listen = "0.0.0.0:8080"; http.tokenFile = token; openFirewall = true; });
  socket = ok (base // { http.listen = "/run/task-pipeline/http.sock"; });
  publicNoToken = asserts (base // { http.listen = "0.0.0.0:8080"; });
  v6NoToken = asserts (base // { http.listen = "[::]:8080"; });
  nameNoToken = asserts (base // { http.listen = "dashboard.example.org:8080"; });
  lowPort = asserts (base // { http.listen = "127.0.0.1:80"; });
  noPort = asserts (base // { http.listen = "127.0.0.1"; });
  bigPort = asserts (base // { http.listen = "127.0.0.1:99999"; });
  tokenAlone = asserts (base // { http.tokenFile = token; });
  tokenInStore = asserts (base // { http.listen = "127.0.0.1:8080"; http.tokenFile = "/nix/store/abc-token"; });
  tokenNixPath = fails (base // { http.listen = "127.0.0.1:8080"; http.tokenFile = ./x; });
  firewallNoListen = asserts (base // { openFirewall = true; });
  firewallSocket = asserts (base // { http.listen = "/run/task-pipeline/http.sock"; openFirewall = true; });
  badListen = fails (base // { http.listen = 8080; });
}
"""


def test_nixos_module_http(nix: str) -> None:
    r = nix_eval_expr(HTTP_EXPR.replace("STUB", str(STUB)).replace("ROOT", str(ROOT)))

    def unit(name: str) -> tuple[dict, list[str]]:
        assert r[name]["failedAssertions"] == [], (name, r[name]["failedAssertions"])
        sc = r[name]["config"]["systemd"]["services"]["task-pipeline"]["serviceConfig"]
        return sc, shlex.split(sc["ExecStart"])

    sc, argv = unit("off")
    assert "--http" not in argv and "LoadCredential" not in sc and "RuntimeDirectory" not in sc
    assert r["off"]["config"]["networking"]["firewall"]["allowedTCPPorts"] == []

    for name, listen in (("loopback", "127.0.0.1:8080"), ("v6loopback", "[::1]:8080")):
        sc, argv = unit(name)
        assert argv[argv.index("--http") + 1] == listen and "--http-token-file" not in argv
        assert r[name]["config"]["networking"]["firewall"]["allowedTCPPorts"] == [], "openFirewall defaults to false"

    # other machines: the token comes as a credential, read by systemd, named by %d; the port opens
    sc, argv = unit("public")
    assert argv[argv.index("--http") + 1] == "0.0.0.0:8080"
    assert argv[argv.index("--http-token-file") + 1] == "%d/http-token"
    assert re.search(r"(?<!%)%d/http-token", sc["ExecStart"]), "systemd must expand %d"
    assert sc["LoadCredential"] == ["db-password:/run/secrets/tp-db", "http-token:/run/secrets/tp-http-token"]
    assert "/run/secrets/tp-http-token" not in sc["ExecStart"]
    assert r["public"]["config"]["networking"]["firewall"]["allowedTCPPorts"] == [8080]
    assert "AF_INET" in sc["RestrictAddressFamilies"] and "AF_INET6" in sc["RestrictAddressFamilies"]

    sc, argv = unit("socket")
    assert argv[argv.index("--http") + 1] == "/run/task-pipeline/http.sock"
    assert sc["RuntimeDirectory"] == "task-pipeline" and "ReadWritePaths" not in sc
    assert "AF_UNIX" in sc["RestrictAddressFamilies"]

    for name in ("publicNoToken", "v6NoToken", "nameNoToken"):
        assert any("reached from other machines" in m and "http.tokenFile" in m for m in r[name]), name
    assert any("from 1024 to 65535" in m for m in r["lowPort"]) and any("from 1024 to 65535" in m for m in r["bigPort"])
    assert any("HOST:PORT" in m for m in r["noPort"])
    assert any("needs http.listen" in m for m in r["tokenAlone"])
    assert any("outside the Nix store" in m for m in r["tokenInStore"])
    assert r["tokenNixPath"] is True   # a Nix path would be copied to the store
    assert any("openFirewall needs" in m for m in r["firewallNoListen"])
    assert any("openFirewall needs" in m for m in r["firewallSocket"])
    assert r["badListen"] is True


# 4f: the NixOS VM tests cannot run here (KVM, the real nixpkgs), but their scripts
# must at least compile as Python and drive every machine they declare -------------


def test_vm_test_scripts_compile(nix: str) -> None:
    tests = nix_eval_expr(
        MODULE_PRELUDE.replace("STUB", str(STUB)).replace("ROOT", str(ROOT))
        + """
          self' = self // { nixosModules.default = module; };
          load = f: let t = import f { self = self'; }; in {
            inherit (t) name testScript;
            nodes = builtins.attrNames t.nodes;
          };
        in map load [ ROOT/nix/vm-test.nix ROOT/nix/vm-test-multinode.nix ]
        """.replace("ROOT", str(ROOT))
    )
    assert len(tests) == 2
    for t in tests:
        code = compile(t["testScript"], t["name"], "exec")
        names = set(code.co_names)
        for node in t["nodes"]:
            assert node in names, f"{t['name']}: node {node} is never used"
        assert "start_all" in names or all(n in names for n in t["nodes"])


# 5 -------------------------------------------------------------------------------

AWKWARD = [
    'echo "double \\"quoted\\"" > "$OUTPUT_DIR/done"',
    "cat <<'EOF' > $OUTPUT_DIR/done\n'''triple''' and \"\"\"triple\"\"\"\nEOF\n",
    "printf 'a\\\\b\\n' # backslashes \\ \\\\ \\n \\u00e9 \\U0001F600 \\x41\\",
    "echo 'héllo wörld ✓ 日本語 🚀 ∀x∈ℝ' # unicode",
    "line one\n\tindented with a tab\r\nwindows line\n\n\ntrailing newlines\n\n",
    "echo ${HOME} $INPUT_FILE '${x}' $${y} `date` # dollar signs",
    "echo '#' [table] [[step]] key = \"value\" # TOML-looking text",
]


def random_scripts(n: int) -> list[str]:
    rng = random.Random(20240605)
    alphabet = (
        ["a", "Z", "0", " ", "'", '"', "\\", "\n", "\t", "\r", "$", "{", "}", "#", "=", "[", "]"]
        + ["\x01", "\x08", "\x0c", "\x1b", "\x1f", "\x7f", "\u0080", "\u00e9", "\u2028", "\ufeff", "\U0001f600"]
        + ["'''", '"""', "\\u0041", "\\n", "${"]
    )
    return ["echo " + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _steps_nix(scripts: list[str]) -> str:
    """The awkward scripts written as Nix source: an attrset of steps."""
    entries = []
    for i, script in enumerate(scripts):
        extra = " start = true; schedule = \"15m\";" if i == 0 else f" inputs = [ \"s{i}\" \"s{i}-*\" ];"
        entries.append(
            f"s{i} = {{ script = {nix_str(script)}; shell = \"bash\"; retries = {i}; retry_delay = 0.5;"
            f" timeout = 60; parallel = 2; env = {{ LANG = \"C\"; \"ODD KEY.x\" = {nix_str(script)}; }};{extra} }};"
        )
    return '{ pipeline = { workdir = "work dir/ü"; }; steps = {\n' + "\n".join(entries) + "\n}; }\n"


def test_mk_manifest_round_trips_through_the_loader(nix: str, tmp_path: Path) -> None:
    from task_pipeline.manifest import load_manifest

    awkward = AWKWARD
    randoms = random_scripts(40)
    (tmp_path / "steps.nix").write_text(_steps_nix(awkward), encoding="utf-8")
    listed = {
        "steps": [
            {"name": f"r{i}", "script": s, "env": {"V": s}, "timeout": None} for i, s in enumerate(randoms)
        ]
    }
    (tmp_path / "steps.json").write_text(json.dumps(listed), encoding="utf-8")

    out = nix_eval_flake(
        "lib",
        f"""l: let
              pkgs = import {STUB}/pkgs.nix {{ lib = import {STUB}/lib.nix; system = "{SYSTEM}"; }};
              fromNix = import {tmp_path}/steps.nix;
              fromJSON = builtins.fromJSON (builtins.readFile {tmp_path}/steps.json);
              both = args: {{ toml = builtins.readFile (l.mkManifest pkgs args); value = l.toManifest args; }};
              rejects = args: !(builtins.tryEval (builtins.deepSeq (l.toManifest args) true)).success;
            in {{
              nix = both fromNix;
              json = both fromJSON;
              misspeltKey = rejects {{ steps.a = {{ script = "x"; scirpt = "y"; }}; }};
              noScript = rejects {{ steps.a = {{ start = true; }}; }};
              renamed = rejects {{ steps.a = {{ name = "b"; script = "x"; }}; }};
              unnamed = rejects {{ steps = [ {{ script = "x"; }} ]; }};
            }}""",
        impure=True,
    )
    assert out["misspeltKey"] and out["noScript"] and out["renamed"] and out["unnamed"]

    py_env = dict(os.environ)
    py_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), py_env.get("PYTHONPATH")]))
    for label, scripts, names in (
        ("nix", awkward, [f"s{i}" for i in range(len(awkward))]),
        ("json", randoms, [f"r{i}" for i in range(len(randoms))]),
    ):
        toml_text, value = out[label]["toml"], out[label]["value"]
        path = tmp_path / f"{label}.toml"
        path.write_bytes(toml_text.encode("utf-8"))
        # the TOML holds exactly the Nix value (null-valued keys left out)
        assert tomllib.loads(toml_text) == value, label
        # task-pipeline's own loader accepts it, and scripts survive byte for byte
        m = load_manifest(path)
        by_name = {s.name: s for s in m.steps}
        assert sorted(by_name) == sorted(names), label
        for name, script in zip(names, scripts):
            assert by_name[name].script.encode("utf-8") == script.encode("utf-8"), (label, name)
            if label == "nix":
                assert by_name[name].env["ODD KEY.x"] == script
            else:
                assert by_name[name].env["V"] == script and by_name[name].timeout is None
        if label == "nix":
            assert m.steps[0].start and m.steps[0].schedule == 15 * 60
            assert m.workdir == (tmp_path / "work dir" / "ü").resolve()
    # and so does the command line
    for label in ("nix", "json"):
        path = tmp_path / f"{label}.toml"
        proc = subprocess.run(
            [sys.executable, "-m", "task_pipeline", "validate", "-manifest", str(path)],
            cwd=ROOT, env=py_env, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, f"{label}: validate exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
