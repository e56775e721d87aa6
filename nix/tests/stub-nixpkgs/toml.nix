# A small TOML writer in pure Nix, standing in for pkgs.formats.toml's remarshal in the
# stub (real nixpkgs converts JSON to TOML with remarshal). Strings are TOML basic
# strings: JSON's escapes (\" \\ \n \t \r \b \f \u00XX) are all valid TOML, and DEL,
# which TOML requires escaped but JSON does not, is escaped on top.
let
  del = builtins.fromJSON ''"\u007f"'';

  isTable = v: builtins.isAttrs v && !((v.type or null) == "derivation");
  isArrayOfTables = v: builtins.isList v && v != [ ] && builtins.all isTable v;

  str = s: builtins.replaceStrings [ del ] [ "\\u007f" ] (builtins.toJSON s);
  key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else str k;

  value =
    v:
    if builtins.isString v then
      str v
    else if builtins.isBool v then
      (if v then "true" else "false")
    else if builtins.isInt v then
      toString v
    else if builtins.isFloat v then
      (
        let
          s = builtins.toJSON v;
        in
        if builtins.match ".*[.eE].*" s != null then s else s + ".0"
      )
    else if builtins.isList v then
      "[ ${builtins.concatStringsSep ", " (map value v)} ]"
    else if isTable v then
      "{ ${builtins.concatStringsSep ", " (map (k: "${key k} = ${value v.${k}}") (builtins.attrNames v))} }"
    else if v == null then
      throw "stub formats.toml: TOML has no null"
    else
      throw "stub formats.toml: cannot write a ${builtins.typeOf v}";

  pairs = t: builtins.concatStringsSep "" (map (k: "${key k} = ${value t.${k}}\n") (builtins.attrNames t));

  toTOML =
    doc:
    let
      names = builtins.attrNames doc;
      plain = builtins.filter (k: !(isTable doc.${k}) && !(isArrayOfTables doc.${k})) names;
      tables = builtins.filter (k: isTable doc.${k}) names;
      arrays = builtins.filter (k: isArrayOfTables doc.${k}) names;
    in
    if !(isTable doc) then
      throw "stub formats.toml: the document must be an attribute set"
    else
      pairs (builtins.intersectAttrs (builtins.listToAttrs (map (k: { name = k; value = null; }) plain)) doc)
      + builtins.concatStringsSep "" (map (k: "\n[${key k}]\n" + pairs doc.${k}) tables)
      + builtins.concatStringsSep "" (
        map (k: builtins.concatStringsSep "" (map (t: "\n[[${key k}]]\n" + pairs t) doc.${k})) arrays
      );

  # what TOML can hold (the check of formats.toml's type)
  isTomlValue =
    v:
    builtins.isString v
    || builtins.isBool v
    || builtins.isInt v
    || builtins.isFloat v
    || (builtins.isList v && builtins.all isTomlValue v)
    || (isTable v && builtins.all (k: isTomlValue v.${k}) (builtins.attrNames v));
in
{
  inherit toTOML isTomlValue;
}
