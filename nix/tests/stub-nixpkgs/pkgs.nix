# Stub of nixpkgs.legacyPackages.<system>: trivial but real derivations (never built
# by the tests: `flake check --no-build` only instantiates them).
{ lib, system }:
let
  toml = import ./toml.nix;

  mkDrv =
    name: attrs:
    derivation {
      inherit name system;
      builder = "/bin/sh";
      args = [
        "-c"
        "echo stub > $out"
      ];
    }
    // attrs;

  pkg =
    pname:
    mkDrv pname {
      inherit pname;
      meta.mainProgram = pname;
    };

  # Passes only the arguments the function declares; a required argument that is
  # not in scope is an error (unlike nixpkgs, which says "did you mean").
  callPackageWith =
    scope: fn: overrides:
    let
      f = if builtins.isFunction fn then fn else import fn;
    in
    f (builtins.intersectAttrs (builtins.functionArgs f) scope // overrides);

  requireArgs =
    what: names: args:
    let
      missing = builtins.filter (n: !(args ? ${n})) names;
    in
    if missing == [ ] then args else throw "stub ${what}: missing ${builtins.head missing}";

  python3Packages = {
    inherit lib;
    callPackage = callPackageWith python3Packages;

    # Returns a derivation; the arguments it got are in `stubArgs` (real nixpkgs drops
    # `dependencies` and `build-system` from the derivation: do not rely on them).
    buildPythonApplication =
      args0:
      let
        args = requireArgs "buildPythonApplication" [
          "pname"
          "version"
          "src"
        ] args0;
        deps = (args.dependencies or [ ]) ++ (args.build-system or [ ]) ++ (args.nativeCheckInputs or [ ]);
      in
      if !(builtins.isPath args.src || builtins.isString args.src) then
        throw "stub buildPythonApplication: src must be a path"
      else if !(builtins.all lib.isDerivation deps) then
        throw "stub buildPythonApplication: a dependency is not a derivation"
      else if !(args ? pyproject || args ? format) then
        throw "stub buildPythonApplication: set pyproject = true"
      else
        mkDrv "${args.pname}-${args.version}" {
          inherit (args) pname version;
          meta = args.meta or { };
          stubArgs = builtins.removeAttrs args [ "src" ];
          stubDependencyNames = map (d: d.pname) (args.dependencies or [ ]);
        };
  }
  // lib.genAttrs [
    "aiosqlite"
    "anyio"
    "blake3"
    "rich"
    "tomli-w"
    "psycopg"
    "obstore"
    "starlette"
    "hypercorn"
    "jinja2"
    "prometheus-client"
    "hatchling"
    "setuptools"
    "pytest"
    "pytest-xdist"
    "hypothesis"
    "pytestCheckHook"
  ] pkg;

  python3 = mkDrv "python3" {
    pname = "python3";
    meta.mainProgram = "python3";
    pkgs = python3Packages;
    withPackages =
      f:
      let
        ps = f python3Packages;
      in
      mkDrv "python3-env" {
        stubPackageNames = map (p: p.pname) ps;
      };
  };
in
{
  inherit lib python3 python3Packages;
  stdenv.hostPlatform.system = system;

  bash = pkg "bash";
  coreutils = pkg "coreutils";
  ruff = pkg "ruff";
  nixfmt = pkg "nixfmt";

  mkShell =
    args:
    if builtins.all lib.isDerivation (args.packages or [ ]) then
      mkDrv "shell" { stubArgs = args; }
    else
      throw "stub mkShell: packages must be derivations";

  formats.toml =
    { }:
    {
      type = lib.types.mkType "toml value" toml.isTomlValue;
      generate = name: value: builtins.toFile name (toml.toTOML value);
    };

  # Checks the shape of the test, and evaluates every node's use of the module with
  # the stub module evaluator (option types, assertions, the unit merged with the
  # node's other definitions). A node may be a function of { config, lib, pkgs, ... }
  # as in NixOS; its `config` is not available here (using it where the stub looks
  # is an error). Nodes that import no module only have to be attribute sets.
  testers.runNixOSTest =
    test:
    let
      nodeArgs = {
        inherit lib;
        pkgs = import ./pkgs.nix { inherit lib system; };
        config = throw "stub runNixOSTest: a node's `config` is not available in the stub";
        nodes = test.nodes;
        modulesPath = "/stub/nixos/modules";
      };
      asAttrs =
        name: node:
        let
          n = if builtins.isFunction node then node nodeArgs else node;
        in
        if builtins.isAttrs n then n else throw "stub runNixOSTest: node ${name} is not an attribute set";
      evalNode =
        name: node0:
        let
          node = asAttrs name node0;
        in
        map (
          m:
          (import ./eval-module.nix {
            inherit lib system;
            module = m;
            config = node;
          }).check
        ) (node.imports or [ ]);
      checked = builtins.deepSeq (lib.mapAttrs evalNode test.nodes) true;
    in
    if !(builtins.isString test.name && builtins.isString test.testScript && test.nodes != { }) then
      throw "stub runNixOSTest: needs name, nodes and testScript"
    else
      builtins.seq checked (mkDrv "vm-test-run-${test.name}" { });
}
