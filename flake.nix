{
  description = "task-pipeline: a content-addressed task queue of shell-script steps";

  # No flake.lock is committed: `nix` locks nixpkgs on first use
  # (or pin it yourself with `inputs.task-pipeline.inputs.nixpkgs.follows = "nixpkgs"`).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      manifest = import ./nix/manifest.nix;
    in
    {
      packages = forAllSystems (pkgs: rec {
        task-pipeline = pkgs.python3Packages.callPackage ./nix/package.nix { };
        default = task-pipeline;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps:
              [
                # [project].dependencies (tests/test_nix.py checks they match pyproject.toml)
                ps.anyio
                ps.blake3
                ps.rich
                ps.tomli-w
                ps.psycopg # the postgres extra
                # the web extra
                ps.starlette
                ps.hypercorn
                ps.jinja2
                ps.prometheus-client
                # build and test
                ps.hatchling
                ps.pytest
                ps.pytest-xdist
                ps.hypothesis
              ]
              # the s3 extra (obstore), where nixpkgs has it
              ++ lib.optional (ps ? obstore) ps.obstore
            ))
            pkgs.ruff
          ];
          shellHook = ''
            export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
          '';
        };
      });

      overlays.default = final: prev: {
        task-pipeline = final.python3Packages.callPackage ./nix/package.nix { };
      };

      # RFC 166 style (`nixfmt` is the RFC-style formatter; `nixfmt-rfc-style` is its old name)
      formatter = forAllSystems (pkgs: pkgs.nixfmt);

      nixosModules.default = import ./nix/module.nix { inherit self; };

      # task-pipeline.lib.toManifest { pipeline ? { }, steps }: the manifest as a Nix value.
      # task-pipeline.lib.mkManifest pkgs { pipeline ? { }, steps }: a manifest TOML file.
      # See nix/manifest.nix.
      lib = {
        inherit (manifest) toManifest mkManifest;
      };

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm-test = pkgs.testers.runNixOSTest (import ./nix/vm-test.nix { inherit self; });
        # two workers, PostgreSQL and NFS on a third machine
        vm-test-multinode = pkgs.testers.runNixOSTest (import ./nix/vm-test-multinode.nix { inherit self; });
      });
    };
}
