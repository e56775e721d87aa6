# Stub of the parts of nixpkgs' lib that task-pipeline's Nix files use. Behaviour
# follows nixpkgs where it matters to the tests; option types carry `check`.
let
  lib = rec {
    genAttrs =
      names: f:
      builtins.listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
    mapAttrs = builtins.mapAttrs;
    filterAttrs =
      pred: set:
      builtins.removeAttrs set (builtins.filter (n: !(pred n set.${n})) (builtins.attrNames set));
    optionals = cond: list: if cond then list else [ ];
    optional = cond: elem: if cond then [ elem ] else [ ];
    optionalAttrs = cond: set: if cond then set else { };
    hasPrefix = pre: s: builtins.substring 0 (builtins.stringLength pre) s == pre;
    removePrefix =
      pre: s:
      if hasPrefix pre s then
        builtins.substring (builtins.stringLength pre) (builtins.stringLength s) s
      else
        s;
    concatStringsSep = builtins.concatStringsSep;
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";

    # as in nixpkgs: single quotes, ' written as '\''
    escapeShellArg =
      arg:
      let
        s = toString arg;
      in
      if builtins.match "[[:alnum:],._+:@%/-]+" s != null then
        s
      else
        "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);

    getExe =
      pkg:
      if pkg ? meta.mainProgram then
        "${pkg}/bin/${pkg.meta.mainProgram}"
      else
        throw "stub lib.getExe: ${pkg.name or "package"} has no meta.mainProgram";

    licenses.mit = {
      spdxId = "MIT";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];

    # lib.fileset: no filtering here, but every file named must exist.
    fileset = {
      unions =
        paths:
        map (
          p: if builtins.pathExists p then p else throw "stub lib.fileset.unions: ${toString p} does not exist"
        ) paths;
      toSource =
        { root, fileset }:
        builtins.seq (builtins.deepSeq fileset null) root;
    };

    # --- module system (just enough for nix/tests/eval-module.nix) ---
    mkOption =
      {
        type,
        default ? null,
        ...
      }@args:
      args // { _type = "option"; };
    mkEnableOption =
      name:
      mkOption {
        type = types.bool;
        default = false;
        description = "Whether to enable ${name}.";
      };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    # priorities as in nixpkgs: the lowest number wins; a plain definition is 100
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkVMOverride = mkOverride 10;
    # order is not modelled: the stub's merge just unwraps these
    mkOrder = priority: content: {
      _type = "order";
      inherit priority content;
    };
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };

    types = rec {
      mkType = name: check: { inherit name check; };
      bool = mkType "bool" builtins.isBool;
      str = mkType "str" builtins.isString;
      # as in nixpkgs: the whole string must match (builtins.match anchors the pattern)
      strMatching = pattern: mkType "string matching ${pattern}" (v: builtins.isString v && builtins.match pattern v != null);
      int = mkType "int" builtins.isInt;
      ints.positive = mkType "positive int" (v: builtins.isInt v && v > 0);
      path = mkType "path" (
        v: builtins.isPath v || (builtins.isString v && hasPrefix "/" v) || isDerivation v
      );
      package = mkType "package" isDerivation;
      nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v);
      listOf = t: mkType "list of ${t.name}" (v: builtins.isList v && builtins.all t.check v);
      attrsOf =
        t:
        mkType "attrs of ${t.name}" (
          v: builtins.isAttrs v && builtins.all (n: t.check v.${n}) (builtins.attrNames v)
        );
    };
  };
in
lib
