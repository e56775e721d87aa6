# The task-pipeline Python application, built from this repository.
# Called from flake.nix as `python3Packages.callPackage ./nix/package.nix { }`.
{
  lib,
  buildPythonApplication,
  hatchling,
  anyio,
  blake3,
  rich,
  tomli-w,
  psycopg,
  # the s3 extra; null where nixpkgs has no python3Packages.obstore (then withS3 is off)
  obstore ? null,
  starlette,
  hypercorn,
  jinja2,
  prometheus-client,
  pytestCheckHook,
  pytest-xdist,
  hypothesis,
  # PostgreSQL stores (`-db postgresql://...`, [project.optional-dependencies] postgres): on by
  # default, since the NixOS module may point several machines at one database
  withPostgres ? true,
  # objects in an S3 bucket (`--objects s3://...`, [project.optional-dependencies] s3): on
  # whenever nixpkgs has obstore
  withS3 ? (obstore != null),
  # `serve --http` (the API, dashboard and /metrics; [project.optional-dependencies] web): on by
  # default, since the NixOS module's `http.listen` needs it
  withWeb ? true,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
  # [project.optional-dependencies] (the binary wheel's job is done by nixpkgs' psycopg with libpq)
  optional-dependencies = {
    postgres = [ psycopg ];
    web = [
      starlette
      hypercorn
      jinja2
      prometheus-client
    ];
  }
  // lib.optionalAttrs (obstore != null) {
    s3 = [ obstore ];
  };
in
buildPythonApplication {
  pname = "task-pipeline";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the build needs: a change to nix/ or to docs does not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md # pyproject.toml's `readme`: hatchling needs it
      ../task_pipeline
      ../tests
    ];
  };

  build-system = [ hatchling ];

  # Keep in step with [project].dependencies in pyproject.toml (tests/test_nix.py checks it).
  dependencies = [
    anyio
    blake3
    rich
    tomli-w
  ]
  ++ lib.optionals withPostgres optional-dependencies.postgres
  ++ lib.optionals withWeb optional-dependencies.web
  ++ lib.optionals withS3 (
    optional-dependencies.s3 or (throw "task-pipeline: withS3 needs python3Packages.obstore, which this nixpkgs lacks")
  );
  inherit optional-dependencies;

  nativeCheckInputs = [
    pytestCheckHook
    pytest-xdist # pyproject's addopts run the suite on three workers
    hypothesis
  ];

  # The tests call the CLI as `sys.executable -m task_pipeline`; tests that need
  # `nix` itself skip without it (there is no nix inside the build sandbox).
  pythonImportsCheck = [ "task_pipeline" ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "task-pipeline";
    platforms = lib.platforms.linux;
  };
}
