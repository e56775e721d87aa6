# A very small stand-in for NixOS's evalModules, enough to test nix/module.nix offline:
# option values are the user's or the default and must pass the type's check; an
# unknown option inside the module's namespace is an error; `mkIf` is resolved (a
# false condition drops the definition); assertions are collected.
# Config outside the options the module declares (environment.etc, ...) is ignored.
{
  lib,
  system,
  module,
  config ? { },
}:
let
  pkgs = import ./pkgs.nix { inherit lib system; };

  isOption = v: builtins.isAttrs v && (v._type or null) == "option";
  # a definition under a false mkIf (forces no more than needed: lazy like NixOS)
  isDropped =
    v: builtins.isAttrs v && (v._type or null) == "if" && (!v.condition || isDropped v.content);

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

  resolve =
    v:
    if builtins.isAttrs v then
      if (v._type or null) == "if" then
        resolve v.content
      else if lib.isDerivation v then
        v
      else
        lib.mapAttrs (_: resolve) (lib.filterAttrs (_: x: !(isDropped x)) v)
    else if builtins.isList v then
      map resolve v
    else
      v;

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

  result = if isDropped (mod.config or { }) then { } else resolve (mod.config or { });
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
