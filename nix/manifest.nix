# Build task-pipeline manifests from Nix (exposed by the flake as `lib.toManifest`
# and `lib.mkManifest`). Uses builtins only, so it needs no nixpkgs to evaluate.
#
#   toManifest { pipeline ? { }, steps }  ->  the manifest as a Nix value
#                                            ({ pipeline = ...; step = [ ... ]; })
#   mkManifest pkgs { pipeline ? { }, steps }  ->  a manifest TOML file in the store,
#                                            written by pkgs.formats.toml
#
# `steps` is either
#   - an attribute set of steps, keyed by step name (the usual form; the name is
#     filled in from the key, steps come out sorted by name), or
#   - a list of steps, each with its own `name` (when you want to choose the order).
# A step takes the manifest's keys (name, start, script, parallel, inputs, retries,
# retry_delay, timeout, env, shell, schedule); keys set to null are left out.
let
  stepKeys = [
    "name"
    "start"
    "script"
    "parallel"
    "inputs"
    "retries"
    "retry_delay"
    "timeout"
    "env"
    "shell"
    "schedule"
  ];
  pipelineKeys = [ "workdir" ];

  dropNulls = attrs: builtins.removeAttrs attrs (builtins.filter (k: attrs.${k} == null) (builtins.attrNames attrs));

  checkKeys =
    what: allowed: attrs:
    let
      unknown = builtins.filter (k: !(builtins.elem k allowed)) (builtins.attrNames attrs);
    in
    if unknown == [ ] then
      attrs
    else
      throw "task-pipeline mkManifest: ${what}: unknown key '${builtins.head unknown}' (allowed: ${builtins.concatStringsSep ", " allowed})";

  normaliseStep =
    label: step:
    let
      s = dropNulls step;
    in
    if !(builtins.isAttrs step) then
      throw "task-pipeline mkManifest: step ${label} must be an attribute set"
    else if !(s ? script) then
      throw "task-pipeline mkManifest: step ${label} has no script"
    else
      checkKeys "step ${label}" stepKeys s;

  stepList =
    steps:
    if builtins.isList steps then
      builtins.genList (
        i:
        let
          step = builtins.elemAt steps i;
        in
        if builtins.isAttrs step && step ? name then
          normaliseStep "'${step.name}'" step
        else
          throw "task-pipeline mkManifest: step #${toString (i + 1)} of the list has no name"
      ) (builtins.length steps)
    else if builtins.isAttrs steps then
      map (
        name:
        let
          step = steps.${name};
        in
        if builtins.isAttrs step && step ? name && step.name != name then
          throw "task-pipeline mkManifest: step '${name}' sets a different name '${step.name}'"
        else
          normaliseStep "'${name}'" ({ inherit name; } // step)
      ) (builtins.attrNames steps)
    else
      throw "task-pipeline mkManifest: steps must be an attribute set or a list";

  toManifest =
    {
      pipeline ? { },
      steps,
    }:
    let
      p = checkKeys "[pipeline]" pipelineKeys (dropNulls pipeline);
      s = stepList steps;
    in
    if s == [ ] then
      throw "task-pipeline mkManifest: no steps"
    else
      (if p == { } then { } else { pipeline = p; }) // { step = s; };

  mkManifest =
    pkgs: args: (pkgs.formats.toml { }).generate "task-pipeline-manifest.toml" (toManifest args);
in
{
  inherit toManifest mkManifest;
}
