# A very small stand-in for NixOS's evalModules, enough to test nix/module.nix offline.
#
# `config` is the user's configuration (a NixOS node without the module): its values
# for the options the module declares must pass the type's check, and an unknown
# option inside the module's namespace is an error. Everything else in it (say
# systemd.services.task-pipeline.serviceConfig.X, users.users.x.uid) is a definition
# merged with the module's own config, as NixOS does:
# - `mkIf` is resolved (a false condition drops the definition);
# - priorities (mkOverride, mkDefault, mkForce): the lowest number wins, a plain
#   definition being 100; an override on an attribute set applies to each attribute;
# - at equal priority, lists are concatenated, equal values agree, and other values
#   conflict (an error);
# - mkBefore/mkAfter are unwrapped (order is not modelled).
# Assertions are collected.
{
  lib,
  system,
  module,
  config ? { },
}:
let
  pkgs = import ./pkgs.nix { inherit lib system; };

  kind = v: if builtins.isAttrs v then v._type or null else null;
  isOption = v: kind v == "option";
  # an attribute set to merge attribute by attribute (not a derivation, option, ...)
  isTree = v: builtins.isAttrs v && !(lib.isDerivation v) && !(v ? _type);

  plainPriority = 100;
  # a definition -> null (under a false mkIf) or { priority, value } with the
  # wrappers taken off; the innermost override counts
  peel =
    priority: v:
    let
      k = kind v;
    in
    if k == "if" then
      (if v.condition then peel priority v.content else null)
    else if k == "override" then
      peel v.priority v.content
    else if k == "order" then
      peel priority v.content
    else
      {
        inherit priority;
        value = v;
      };
  wrap = priority: v: if priority == plainPriority then v else lib.mkOverride priority v;

  # merges a list of definitions of one attribute path; null when all are dropped
  mergeDefs =
    path: defs:
    let
      live = builtins.filter (d: d != null) (map (peel plainPriority) defs);
      best = builtins.foldl' (m: d: if d.priority < m then d.priority else m) 100000 live;
      top = builtins.filter (d: d.priority == best) live;
      values = map (d: resolveLeaf path d.value) top;
      first = builtins.head values;
    in
    if live == [ ] then
      null
    else if builtins.all (d: isTree d.value) live then
      let
        names = builtins.attrNames (builtins.foldl' (acc: d: acc // d.value) { } live);
        sub = n: map (d: wrap d.priority d.value.${n}) (builtins.filter (d: d.value ? ${n}) live);
        # lazy like NixOS: deciding that an attribute exists forces its definitions
        # only as far as their mkIf/override wrappers
        kept = builtins.filter (n: builtins.any (d: peel plainPriority d != null) (sub n)) names;
      in
      lib.genAttrs kept (n: mergeDefs (if path == "" then n else "${path}.${n}") (sub n))
    else if builtins.length values == 1 then
      first
    else if builtins.all builtins.isList values then
      builtins.concatLists values
    else if builtins.all (v: v == first) values then
      first
    else
      throw "stub evalModules: ${path} has conflicting definitions (use mkForce or mkDefault)";

  # attribute sets inside lists (assertions, ...) may hold mkIf too
  resolveLeaf =
    path: v:
    if builtins.isList v then
      map (e: if isTree e then mergeDefs path [ e ] else e) v
    else
      v;

  fill =
    path: opts: user:
    let
      names = builtins.attrNames opts;
      leafGroup = builtins.any (n: isOption opts.${n}) names;
      unknown = builtins.filter (n: !(opts ? ${n})) (builtins.attrNames user);
    in
    if leafGroup && unknown != [ ] then
      throw "stub evalModules: the option ${path}.${builtins.head unknown} does not exist"
    else
      lib.mapAttrs (
        n: o:
        let
          p = if path == "" then n else "${path}.${n}";
        in
        if isOption o then
          let
            v = if user ? ${n} then user.${n} else o.default or (throw "stub evalModules: ${p} is used but not defined");
          in
          if o.type.check v then
            v
          else
            throw "stub evalModules: ${p}: a ${builtins.typeOf v} is not a ${o.type.name}"
        else
          fill p o (user.${n} or { })
      ) opts;

  # the user's configuration without the values of the module's options
  strip =
    opts: user:
    builtins.listToAttrs (
      builtins.concatMap (
        n:
        if !(opts ? ${n}) then
          [
            {
              name = n;
              value = user.${n};
            }
          ]
        else if isOption opts.${n} then
          [ ]
        else
          let
            rest = strip opts.${n} user.${n};
          in
          if rest == { } then
            [ ]
          else
            [
              {
                name = n;
                value = rest;
              }
            ]
      ) (builtins.attrNames user)
    );

  mod =
    if builtins.isFunction module then
      module {
        inherit lib pkgs;
        config = values;
        options = { };
      }
    else
      module;
  values = fill "" (mod.options or { }) config;
  userDefinitions = strip (mod.options or { }) (builtins.removeAttrs config [ "imports" ]);

  result = mergeDefs "" [
    (mod.config or { })
    userDefinitions
  ];
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) (result.assertions or [ ]));
in
{
  config = result;
  inherit values failedAssertions;
  # forces everything; throws on a failed assertion, like NixOS does
  check =
    if failedAssertions != [ ] then
      throw "Failed assertions:\n- ${builtins.concatStringsSep "\n- " failedAssertions}"
    else
      builtins.deepSeq result true;
}
