# NixOS module: services.task-pipeline runs `task-pipeline serve` under systemd.
# flake.nix exposes it as nixosModules.default = import ./nix/module.nix { inherit self; };
# `self` only supplies the default package (the flake's own build for the host's system).
{ self }:
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  cfg = config.services.task-pipeline;
  settingsFormat = pkgs.formats.toml { };

  # Scripts run with the pipeline's workdir as their cwd, which defaults to the
  # manifest's directory: read-only in the store or /etc. Settings given in Nix
  # default it to the (writable) state directory instead.
  settingsWithWorkdir =
    cfg.settings
    // {
      pipeline = {
        workdir = cfg.stateDir;
      } // (cfg.settings.pipeline or { });
    };
  generatedManifest = settingsFormat.generate "task-pipeline-manifest.toml" settingsWithWorkdir;

  # With `settings`, the manifest is linked at a stable path in /etc, so that a new
  # configuration reloads the service (SIGHUP) instead of restarting it.
  etcManifest = "/etc/task-pipeline/manifest.toml";
  manifestPath =
    if cfg.settings != null then
      etcManifest
    else if cfg.manifest != null then
      "${cfg.manifest}"
    else
      throw "services.task-pipeline: set `manifest` or `settings`";

  varLib = "/var/lib/";
  underVarLib = lib.hasPrefix varLib cfg.stateDir && cfg.stateDir != varLib;
  dynamicUser = cfg.user == null;
  groupName = if cfg.group == null then cfg.user else cfg.group;

  # --- the store: SQLite in stateDir, or PostgreSQL with objects elsewhere ---
  dbUrl = cfg.database.url;
  usePostgres = dbUrl != null;
  isLocalPath = p: lib.hasPrefix "/" p;
  insideStateDir = p: p == cfg.stateDir || lib.hasPrefix "${cfg.stateDir}/" p;
  inStore = p: lib.hasPrefix "${builtins.storeDir}/" p;
  # a file systemd reads for us: an absolute path outside the (world-readable) store
  goodSecretPath = p: p == null || (isLocalPath p && !(inStore p));
  objectsLocal = cfg.objects != null && isLocalPath cfg.objects;
  # s3://bucket or s3://bucket/prefix: nothing local to mount or make writable
  objectsInBucket = cfg.objects != null && builtins.match "s3://[^/]+(/.*)?" cfg.objects != null;
  s3Settings = cfg.s3.credentialsFile != null || cfg.s3.endpoint != null || cfg.s3.region != null;
  # files systemd reads as root and hands to the daemon in its credentials directory (%d)
  credentials =
    lib.optional (cfg.database.passwordFile != null) "db-password:${cfg.database.passwordFile}"
    ++ lib.optional (cfg.s3.credentialsFile != null) "aws-credentials:${cfg.s3.credentialsFile}"
    ++ lib.optional (cfg.http.tokenFile != null) "http-token:${cfg.http.tokenFile}";
  # the daemon's default for a directory store is <stateDir>/tmp; PostgreSQL needs it said
  scratch =
    if cfg.scratchDir != null then
      cfg.scratchDir
    else if usePostgres then
      "${cfg.stateDir}/tmp"
    else
      null;
  scratchOutside = cfg.scratchDir != null && !(insideStateDir cfg.scratchDir);

  # postgresql://[user@]host[:port]/db or postgres://...; the host, or null if not a URL
  urlParts = if usePostgres then builtins.match "postgres(ql)?://(([^/?#@]*)@)?([^/?#]*)(.*)" dbUrl else null;
  urlUserInfo = if urlParts == null then null else builtins.elemAt urlParts 2;
  urlHostPort = if urlParts == null then "" else builtins.elemAt urlParts 3;
  urlHost =
    let
      bracketed = builtins.match "(\\[[^]]*]).*" urlHostPort;
    in
    if bracketed != null then builtins.head bracketed else builtins.head (builtins.match "([^:]*).*" urlHostPort);
  urlHasPassword =
    usePostgres
    && (
      (urlUserInfo != null && builtins.match ".*:.*" urlUserInfo != null)
      || builtins.match ".*[?&]password=.*" dbUrl != null
    );
  # the database runs on this machine: order the unit after it
  localDatabase =
    urlParts != null
    && (
      builtins.elem urlHost [
        ""
        "localhost"
        "127.0.0.1"
        "[::1]"
      ]
      || builtins.match ".*[?&]host=/.*" dbUrl != null
    );

  # --- serve --http: the API, dashboard and /metrics ---
  httpListen = cfg.http.listen;
  httpOn = httpListen != null;
  httpSocket = httpOn && (lib.hasPrefix "/" httpListen || lib.hasPrefix "unix:" httpListen);
  httpSocketPath = if httpSocket then lib.removePrefix "unix:" httpListen else null;
  # HOST:PORT or [V6]:PORT; null for a socket, or for an address the daemon would refuse
  httpTcp = if httpOn && !httpSocket then builtins.match "(\\[[0-9a-fA-F:.]*]|[^]:[/]+):([1-9][0-9]{0,4})" httpListen else null;
  httpHost = if httpTcp == null then null else builtins.elemAt httpTcp 0;
  httpPort = if httpTcp == null then null else builtins.fromJSON (builtins.elemAt httpTcp 1);
  # what only this machine can reach; anything else needs the token (the daemon refuses it too)
  httpLoopback =
    httpSocket || builtins.elem httpHost [ "localhost" "[::1]" ] || (httpHost != null && lib.hasPrefix "127." httpHost);
  # ProtectSystem=strict leaves /run read-only but for the unit's RuntimeDirectory
  runtimeSocket = httpSocket && lib.hasPrefix "/run/task-pipeline/" httpSocketPath;
  httpToken = cfg.http.tokenFile != null;

  args = [
    "serve"
    "-manifest"
    manifestPath
    "-db"
    (if usePostgres then dbUrl else cfg.stateDir)
  ]
  ++ lib.optionals (cfg.objects != null) [
    "--objects"
    cfg.objects
  ]
  ++ lib.optionals (cfg.cacheSize != null) [
    "--cache-size"
    cfg.cacheSize
  ]
  ++ lib.optionals (scratch != null) [
    "--scratch"
    scratch
  ]
  ++ lib.optionals (cfg.parallel != null) [
    "-parallel"
    (toString cfg.parallel)
  ]
  ++ lib.optionals httpOn [
    "--http"
    httpListen
  ]
  ++ cfg.extraArgs;
  # %d (the unit's credentials directory) must reach systemd unescaped, unlike every other argument
  tokenArgs = if httpToken then " --http-token-file %d/http-token" else "";
  # systemd expands %-specifiers and $VARIABLES in ExecStart: doubled, they arrive as written
  escapeSystemd = builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ];

  readWritePaths =
    lib.optional (!underVarLib) cfg.stateDir
    ++ lib.optional (objectsLocal && !(insideStateDir cfg.objects)) cfg.objects
    ++ lib.optional scratchOutside cfg.scratchDir
    ++ lib.optional (httpSocket && !runtimeSocket && !(insideStateDir httpSocketPath)) (dirOf httpSocketPath);

  # Sandboxing, each set with mkDefault: a plain definition in
  # systemd.services.task-pipeline.serviceConfig replaces it (see the README).
  hardening = lib.mapAttrs (_: lib.mkDefault) {
    NoNewPrivileges = true;
    PrivateTmp = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictNamespaces = true;
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictSUIDSGID = true;
    RestrictRealtime = true;
    LockPersonality = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    MemoryDenyWriteExecute = cfg.memoryDenyWriteExecute;
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    # a filtered system call fails with EPERM instead of killing the script (SIGSYS)
    SystemCallErrorNumber = "EPERM";
    SystemCallArchitectures = "native";
    UMask = "0027";
  };

  # Restarts back off from 5 s to 5 min; the start limit stops a unit that keeps
  # failing (10 starts within an hour). Exit 2 (usage, manifest) is never retried,
  # nor exit 3 (store error) with the SQLite store and local objects. With PostgreSQL
  # or objects in a bucket, exit 3 may be a lost connection, an NFS hiccup or a bucket
  # not reachable yet, that passes, so it is retried within the limit.
  restartPolicy = lib.mapAttrs (_: lib.mkDefault) {
    Restart = "on-failure";
    RestartSec = 5;
    RestartSteps = 5;
    RestartMaxDelaySec = 300;
    RestartPreventExitStatus = [ 2 ] ++ lib.optional (!usePostgres && !objectsInBucket) 3;
  };
  startLimit = lib.mapAttrs (_: lib.mkDefault) {
    StartLimitIntervalSec = 3600;
    StartLimitBurst = 10;
  };
in
{
  options.services.task-pipeline = {
    enable = mkEnableOption "the task-pipeline daemon (`task-pipeline serve`)";

    package = mkOption {
      type = types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      defaultText = lib.literalExpression "task-pipeline.packages.\${pkgs.stdenv.hostPlatform.system}.default";
      description = "The task-pipeline package to run.";
    };

    manifest = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = lib.literalExpression ''"/srv/pipeline/manifest.toml"'';
      description = ''
        The manifest file. A Nix path (`./manifest.toml`) or a file built with
        `task-pipeline.lib.mkManifest` is copied to the store: changing it restarts
        the service. An absolute path given as a string (`"/srv/pipeline/manifest.toml"`)
        is read in place: edit it and run `systemctl reload task-pipeline`.
        Exactly one of `manifest` and `settings` must be set.
      '';
    };

    settings = mkOption {
      type = types.nullOr settingsFormat.type;
      default = null;
      example = lib.literalExpression ''
        {
          step = [
            { name = "fetch"; start = true; schedule = "15m"; script = "curl -fsS https://example.org > $OUTPUT_DIR/process"; }
            { name = "process"; script = "tr a-z A-Z < $INPUT_FILE > $OUTPUT_DIR/done"; }
          ];
        }
      '';
      description = ''
        The manifest written in Nix: a `pipeline` table and a `step` list, with the
        keys of the TOML manifest. It is rendered with `pkgs.formats.toml` and linked
        at `${etcManifest}`; a changed manifest reloads the service (SIGHUP) instead of
        restarting it. `pipeline.workdir` defaults to `stateDir`.
        Exactly one of `manifest` and `settings` must be set.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/task-pipeline";
      description = ''
        The local state directory: the store (`-db`: SQLite database and objects)
        when `database.url` is null; with PostgreSQL, the working directory and the
        default scratch space. Under /var/lib it is managed by systemd
        (StateDirectory); elsewhere it is created by tmpfiles and needs `user` to be set.
      '';
    };

    database = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "postgresql://task-pipeline@db.example.org:5432/task-pipeline";
        description = ''
          A PostgreSQL database shared by every host that works on the same queue
          (`-db URL`, `postgresql://` or `postgres://`). null keeps the SQLite store in
          `stateDir`. The URL is world-readable in the Nix store: it must not hold a
          password; use `database.passwordFile`. Needs `objects`.
        '';
      };

      passwordFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/task-pipeline-db";
        description = ''
          A file holding just the database password, as an absolute path outside the
          Nix store (a string, so that it is not copied there), e.g. written by
          agenix or sops-nix. systemd reads it as root and hands it to the daemon as
          the credential `db-password` (`LoadCredential`), whose path is in
          `TASK_PIPELINE_DB_PASSWORD_FILE`: it works with a DynamicUser, and the file
          can stay readable by root only.
        '';
      };
    };

    objects = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "s3://task-pipeline/objects";
      description = ''
        Where objects live (`--objects`): a directory every host can reach (an NFS
        mount, for instance), or an S3 bucket, `s3://bucket` or `s3://bucket/prefix`
        (see `s3.*` for credentials, endpoint and region). Required with
        `database.url`; null means `stateDir/objects` for the SQLite store. A local
        path outside `stateDir` must exist and be writable by `user` (with the same
        uid on every host when it is shared); it is added to ReadWritePaths, and the
        unit waits for its mount (RequiresMountsFor). A bucket needs neither.
      '';
    };

    s3 = {
      credentialsFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/task-pipeline-s3";
        description = ''
          An AWS shared credentials file for the bucket in `objects` (an INI file with
          `aws_access_key_id` and `aws_secret_access_key`, and `aws_session_token` if
          any, under `[default]` or the profile in `environment.AWS_PROFILE`), as an
          absolute path outside the Nix store (a string, so that it is not copied
          there). systemd reads it as root and hands it to the daemon as the
          credential `aws-credentials` (`LoadCredential`), whose path is in
          `AWS_SHARED_CREDENTIALS_FILE`. null: the keys come from the environment
          (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` in `environmentFile`, which
          win over the file).
        '';
      };

      endpoint = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://s3.example.org";
        description = ''
          The S3 endpoint of a server that is not AWS (Garage, MinIO, SeaweedFS, Ceph),
          set as `AWS_ENDPOINT_URL`; null means AWS. An `http://` endpoint is
          allowed (unencrypted).
        '';
      };

      region = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "eu-central-1";
        description = "The bucket's region, set as `AWS_REGION`; null leaves it to the environment.";
      };
    };

    cacheSize = mkOption {
      type = types.nullOr (types.strMatching "[0-9]+(\\.[0-9]+)?[kKmMgGtT]?([iI]?[bB])?");
      default = null;
      example = "10G";
      description = ''
        With objects in a bucket: keep downloaded objects in a cache of at most this
        many bytes in the scratch space (`--cache-size`, e.g. `500M` or `10G`), so
        that an input used again is not downloaded again. null: no cache.
      '';
    };

    scratchDir = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/cache/task-pipeline";
      description = ''
        Local scratch space for running tasks (`--scratch`), one per host; null means
        `stateDir/tmp`. Outside `stateDir` it is created by tmpfiles and needs `user`.
      '';
    };

    parallel = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "Global concurrency (`-parallel`); null means the number of CPUs.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "-verbose" ];
      description = "Extra arguments for `task-pipeline serve`.";
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        LANG = "C.UTF-8";
      };
      description = ''
        Environment variables for the daemon and so for every script. They end up in
        the unit file, which is world-readable in the Nix store: put secrets (API
        tokens, passwords) in `environmentFile` instead.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/task-pipeline.env";
      description = ''
        A file of `NAME=value` lines added to the environment of the daemon and its
        scripts (systemd's EnvironmentFile, read as root when the service starts):
        the place for secrets. An absolute path outside the Nix store, given as a
        string so that it is not copied there.
      '';
    };

    http = {
      listen = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1:8080";
        description = ''
          Serve the HTTP API, the web dashboard and Prometheus metrics (`/metrics`) on this
          address (`serve --http`): `HOST:PORT`, `[V6]:PORT`, or a unix socket path. null: off.
          An address other machines can reach (anything but 127.0.0.0/8, `localhost`, `[::1]` or a
          socket) needs `http.tokenFile`. The port must be 1024 or above (the unit holds no
          capabilities). A socket under /run/task-pipeline/ gets that directory from systemd
          (RuntimeDirectory); connecting to it needs the service's user.
        '';
      };

      tokenFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/task-pipeline-http-token";
        description = ''
          A file holding the token that the API's actions (retry, invalidate, submit) and the
          dashboard's buttons need (`--http-token-file`; make one with
          `head -c 32 /dev/urandom | base64`). An absolute path outside the Nix store, given as a
          string; systemd reads it as root and hands it to the daemon as the credential
          `http-token` (`LoadCredential`).
        '';
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the TCP port of `http.listen` in the firewall (`networking.firewall.allowedTCPPorts`).
      '';
    };

    memoryDenyWriteExecute = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Forbid memory that is both writable and executable (systemd's
        MemoryDenyWriteExecute) for the daemon and every script. This breaks
        programs that compile code at run time: JITs such as node, java, LuaJIT,
        PyPy, and some Python extensions (numba, for instance); set it to false when
        the scripts run one of them.
      '';
    };

    path = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.curl pkgs.jq ]";
      description = ''
        Packages on the scripts' PATH, in addition to bash (for the default
        `shell = "sh"`) and coreutils.
      '';
    };

    user = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "task-pipeline";
      description = ''
        User to run as. null runs under a systemd DynamicUser (the store is then only
        reachable by the service). Set it to use the CLI on the store, e.g.
        `sudo -u task-pipeline task-pipeline status -db /var/lib/task-pipeline`.
        The user "task-pipeline" is created by this module; any other must exist.
      '';
    };

    group = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = ''
        Group to run as (with `user`); null means the user's name. The group
        "task-pipeline" is created by this module; any other must exist.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.manifest == null) != (cfg.settings == null);
        message = "services.task-pipeline: set exactly one of `manifest` and `settings`.";
      }
      {
        assertion = underVarLib || !dynamicUser;
        message = "services.task-pipeline: a stateDir outside /var/lib (${cfg.stateDir}) needs `user` to be set (a DynamicUser cannot own it).";
      }
      {
        assertion = cfg.group == null || !dynamicUser;
        message = "services.task-pipeline: `group` needs `user` to be set.";
      }
      {
        assertion = !usePostgres || urlParts != null;
        message = "services.task-pipeline: database.url must start with postgresql:// or postgres:// (got ${toString dbUrl}).";
      }
      {
        assertion = !urlHasPassword;
        message = "services.task-pipeline: database.url must not contain a password (it would be world-readable in the Nix store); use database.passwordFile.";
      }
      {
        assertion = !usePostgres || cfg.objects != null;
        message = "services.task-pipeline: database.url needs `objects` to be set: a directory every host can reach, or an S3 bucket (s3://bucket/prefix), where the objects live.";
      }
      {
        assertion = cfg.database.passwordFile == null || usePostgres;
        message = "services.task-pipeline: database.passwordFile needs database.url to be set.";
      }
      {
        assertion = goodSecretPath cfg.database.passwordFile && goodSecretPath cfg.environmentFile;
        message = "services.task-pipeline: database.passwordFile and environmentFile must be absolute paths outside the Nix store (given as strings, not Nix paths).";
      }
      {
        assertion = goodSecretPath cfg.s3.credentialsFile;
        message = "services.task-pipeline: s3.credentialsFile must be an absolute path outside the Nix store (given as a string, not a Nix path), got ${toString cfg.s3.credentialsFile}.";
      }
      {
        assertion = cfg.objects == null || objectsLocal || objectsInBucket;
        message = "services.task-pipeline: `objects` must be an absolute path or an S3 bucket, s3://bucket/prefix (got ${toString cfg.objects}).";
      }
      {
        assertion = !s3Settings || objectsInBucket;
        message = "services.task-pipeline: s3.credentialsFile, s3.endpoint and s3.region are for objects in a bucket: set `objects` to s3://bucket/prefix.";
      }
      {
        assertion = cfg.cacheSize == null || objectsInBucket;
        message = "services.task-pipeline: cacheSize is for objects in a bucket (objects = \"s3://bucket/prefix\"); objects in a directory need no cache.";
      }
      {
        assertion = !(objectsLocal && !(insideStateDir cfg.objects) && dynamicUser);
        message = "services.task-pipeline: objects outside stateDir (${toString cfg.objects}) need `user` to be set (a DynamicUser cannot own them; give the user the same uid on every host).";
      }
      {
        assertion = cfg.scratchDir == null || isLocalPath cfg.scratchDir;
        message = "services.task-pipeline: scratchDir must be an absolute path.";
      }
      {
        assertion = !httpOn || httpSocket || httpTcp != null;
        message = "services.task-pipeline: http.listen must be HOST:PORT, [V6]:PORT or a socket path, with a port from 1 to 65535 (got ${toString httpListen}).";
      }
      {
        assertion = httpPort == null || (httpPort >= 1024 && httpPort <= 65535);
        message = "services.task-pipeline: http.listen's port must be from 1024 to 65535: the unit holds no capability to bind lower ones (got ${toString httpPort}).";
      }
      {
        assertion = !httpOn || httpLoopback || httpToken;
        message = "services.task-pipeline: http.listen ${toString httpListen} can be reached from other machines, which could then change the store: set http.tokenFile (actions then need its token), or listen on 127.0.0.1.";
      }
      {
        assertion = !httpToken || httpOn;
        message = "services.task-pipeline: http.tokenFile needs http.listen to be set.";
      }
      {
        assertion = goodSecretPath cfg.http.tokenFile;
        message = "services.task-pipeline: http.tokenFile must be an absolute path outside the Nix store (given as a string, not a Nix path).";
      }
      {
        assertion = !cfg.openFirewall || httpPort != null;
        message = "services.task-pipeline: openFirewall needs http.listen to be a TCP address (HOST:PORT).";
      }
      {
        assertion = !(scratchOutside && dynamicUser);
        message = "services.task-pipeline: a scratchDir outside stateDir (${toString cfg.scratchDir}) needs `user` to be set.";
      }
    ];

    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = lib.optional (cfg.openFirewall && httpPort != null) httpPort;

    environment.etc = lib.optionalAttrs (cfg.settings != null) {
      "task-pipeline/manifest.toml".source = generatedManifest;
    };

    users.users = lib.optionalAttrs (cfg.user == "task-pipeline") {
      task-pipeline = {
        isSystemUser = true;
        group = groupName;
        home = cfg.stateDir;
        description = "task-pipeline daemon";
      };
    };
    users.groups = lib.optionalAttrs (!dynamicUser && groupName == "task-pipeline") {
      task-pipeline = { };
    };

    systemd.tmpfiles.rules =
      lib.optionals (!underVarLib && !dynamicUser) [
        "d ${cfg.stateDir} 0750 ${cfg.user} ${groupName} - -"
      ]
      ++ lib.optionals (scratchOutside && !dynamicUser) [
        "d ${cfg.scratchDir} 0750 ${cfg.user} ${groupName} - -"
      ];

    systemd.services.task-pipeline = {
      description = "task-pipeline daemon";
      wantedBy = [ "multi-user.target" ];
      # network-online: a shared database, objects on NFS or in a bucket must be reachable
      wants = [ "network-online.target" ] ++ lib.optional localDatabase "postgresql.service";
      after = [
        "network.target"
        "network-online.target"
      ]
      ++ lib.optionals localDatabase [
        "postgresql.service"
        # nixpkgs >= 25.11: the database and its ensureUsers/ensureDatabases are ready
        "postgresql.target"
      ];
      path = [
        pkgs.bash
        pkgs.coreutils
      ]
      ++ cfg.path;
      environment =
        cfg.environment
        // lib.optionalAttrs (cfg.database.passwordFile != null) {
          # %d: the unit's credentials directory (systemd expands it)
          TASK_PIPELINE_DB_PASSWORD_FILE = "%d/db-password";
        }
        // lib.optionalAttrs (cfg.s3.credentialsFile != null) {
          AWS_SHARED_CREDENTIALS_FILE = "%d/aws-credentials";
        }
        // lib.optionalAttrs (cfg.s3.endpoint != null) {
          AWS_ENDPOINT_URL = cfg.s3.endpoint;
        }
        // lib.optionalAttrs (cfg.s3.region != null) {
          AWS_REGION = cfg.s3.region;
        };
      reloadTriggers = lib.optionals (cfg.settings != null) [ generatedManifest ];

      unitConfig =
        startLimit
        // lib.optionalAttrs objectsLocal {
          RequiresMountsFor = [ cfg.objects ];
        };

      serviceConfig =
        hardening
        // restartPolicy
        // {
          ExecStart = "${lib.getExe cfg.package} ${escapeSystemd (lib.escapeShellArgs args)}${tokenArgs}";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          # SIGTERM drains: running tasks get a grace period, then are re-queued.
          KillMode = "mixed";
          TimeoutStopSec = 120;

          DynamicUser = dynamicUser;
          WorkingDirectory = cfg.stateDir;
        }
        // lib.optionalAttrs underVarLib {
          StateDirectory = lib.removePrefix varLib cfg.stateDir;
          StateDirectoryMode = "0750";
        }
        // lib.optionalAttrs (readWritePaths != [ ]) {
          ReadWritePaths = readWritePaths;
        }
        // lib.optionalAttrs (cfg.environmentFile != null) {
          EnvironmentFile = cfg.environmentFile;
        }
        // lib.optionalAttrs (credentials != [ ]) {
          LoadCredential = credentials;
        }
        // lib.optionalAttrs runtimeSocket {
          RuntimeDirectory = "task-pipeline";
          RuntimeDirectoryMode = "0750";
        }
        // lib.optionalAttrs (!dynamicUser) {
          User = cfg.user;
          Group = groupName;
        };
    };
  };
}
