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

  args = [
    "serve"
    "-manifest"
    manifestPath
    "-db"
    cfg.stateDir
  ]
  ++ lib.optionals (cfg.parallel != null) [
    "-parallel"
    (toString cfg.parallel)
  ]
  ++ cfg.extraArgs;
  # a file systemd reads for us: an absolute path outside the (world-readable) store
  goodSecretPath = p: p == null || (lib.hasPrefix "/" p && !(lib.hasPrefix "${builtins.storeDir}/" p));

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
  # failing (10 starts within an hour). Exit 2 (usage, manifest) and 3 (store error)
  # are never retried: restarting cannot fix either.
  restartPolicy = lib.mapAttrs (_: lib.mkDefault) {
    Restart = "on-failure";
    RestartSec = 5;
    RestartSteps = 5;
    RestartMaxDelaySec = 300;
    RestartPreventExitStatus = [
      2
      3
    ];
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
        The store (`-db`): SQLite database and objects. Under /var/lib it is managed
        by systemd (StateDirectory); elsewhere it is created by tmpfiles and needs
        `user` to be set.
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
        assertion = goodSecretPath cfg.environmentFile;
        message = "services.task-pipeline: environmentFile must be an absolute path outside the Nix store (given as a string, not a Nix path).";
      }
    ];

    environment.systemPackages = [ cfg.package ];

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

    systemd.tmpfiles.rules = lib.optionals (!underVarLib && !dynamicUser) [
      "d ${cfg.stateDir} 0750 ${cfg.user} ${groupName} - -"
    ];

    systemd.services.task-pipeline = {
      description = "task-pipeline daemon";
      wantedBy = [ "multi-user.target" ];
      # scripts (and a store on a network file system) may need the network
      wants = [ "network-online.target" ];
      after = [
        "network.target"
        "network-online.target"
      ];
      path = [
        pkgs.bash
        pkgs.coreutils
      ]
      ++ cfg.path;
      inherit (cfg) environment;
      reloadTriggers = lib.optionals (cfg.settings != null) [ generatedManifest ];

      unitConfig = startLimit;

      serviceConfig =
        hardening
        // restartPolicy
        // {
          ExecStart = "${lib.getExe cfg.package} ${lib.escapeShellArgs args}";
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
        // lib.optionalAttrs (!underVarLib) {
          ReadWritePaths = [ cfg.stateDir ];
        }
        // lib.optionalAttrs (cfg.environmentFile != null) {
          EnvironmentFile = cfg.environmentFile;
        }
        // lib.optionalAttrs (!dynamicUser) {
          User = cfg.user;
          Group = groupName;
        };
    };
  };
}
