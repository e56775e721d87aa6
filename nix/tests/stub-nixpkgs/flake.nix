# A tiny stand-in for nixpkgs, for offline tests only (tests/test_nix.py):
#   nix flake check --no-build --offline --no-write-lock-file \
#     --override-input nixpkgs path:./nix/tests/stub-nixpkgs
# It has just the lib functions and packages task-pipeline's flake uses; callPackage
# passes only the arguments a function asks for, so a misspelt name fails here too.
{
  description = "stub nixpkgs for task-pipeline's offline tests";

  outputs =
    { self }:
    let
      lib = import ./lib.nix;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ] (system: import ./pkgs.nix { inherit lib system; });
    };
}
