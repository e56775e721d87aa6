# NixOS VM test: two workers share one queue in PostgreSQL, with the objects on NFS.
# Run by `nix flake check` (needs KVM):
#   nix build .#checks.x86_64-linux.vm-test-multinode -L
# `db`: PostgreSQL (database and role "tp", the password set from a file) and an NFS
# export for the objects. `worker1`, `worker2`: the same services.task-pipeline
# configuration. Inputs submitted on worker1 are processed by both workers.
{ self }:
let
  dbUrl = "postgresql://tp@db:5432/tp";
  objects = "/mnt/objects";
  # The workers must agree on the owner of the shared objects: a fixed uid and gid.
  uid = 1500;
  # A test-only password. A real system keeps it out of the Nix store (agenix,
  # sops-nix, or a file put there by hand); environment.etc copies it from the store.
  dbPassword = "not-a-secret-4e1f";
  # more than one daemon leases at once (parallel + 16 ahead), so both get work
  inputs = 40;

  worker = {
    imports = [ self.nixosModules.default ];
    users.users.task-pipeline.uid = uid;
    users.groups.task-pipeline.gid = uid;
    # NFSv4: the export with fsid=0 is the server's root
    virtualisation.fileSystems.${objects} = {
      device = "db:/";
      fsType = "nfs";
      options = [ "vers=4" ];
    };
    environment.etc."tp-db-password" = {
      text = dbPassword;
      mode = "0400";
      user = "task-pipeline"; # for the CLI in the test script; the service gets a credential
    };
    services.task-pipeline = {
      enable = true;
      user = "task-pipeline";
      parallel = 2;
      database.url = dbUrl;
      database.passwordFile = "/etc/tp-db-password";
      inherit objects;
      settings.step = [
        {
          name = "upper";
          # the output names the host that ran the task
          script = ''sleep 1; { uname -n; tr a-z A-Z < "$INPUT_FILE"; } > "$OUTPUT_DIR/done"'';
        }
      ];
    };
  };
in
{
  name = "task-pipeline-multinode";

  nodes = {
    db =
      { lib, ... }:
      {
        networking.firewall.allowedTCPPorts = [
          2049 # NFSv4
          5432 # PostgreSQL
        ];

        services.postgresql = {
          enable = true;
          enableTCPIP = true;
          ensureDatabases = [ "tp" ];
          ensureUsers = [
            {
              name = "tp";
              ensureDBOwnership = true;
            }
          ];
          authentication = ''
            host tp tp all scram-sha-256
          '';
        };
        environment.etc."tp-db-password" = {
          text = dbPassword;
          mode = "0400";
        };
        # the role's password, from the file, once ensureUsers has created the role
        systemd.services.postgresql-setup = {
          serviceConfig.LoadCredential = [ "tp-password:/etc/tp-db-password" ];
          script = lib.mkAfter ''
            echo "ALTER ROLE tp PASSWORD :'pw';" \
              | psql -v ON_ERROR_STOP=1 -v pw="$(cat "$CREDENTIALS_DIRECTORY/tp-password")"
          '';
        };

        services.nfs.server = {
          enable = true;
          exports = ''
            /srv/objects *(rw,sync,no_subtree_check,no_root_squash,fsid=0)
          '';
        };
        systemd.tmpfiles.rules = [ "d /srv/objects 0770 ${toString uid} ${toString uid} - -" ];
      };

    worker1 = worker;
    worker2 = worker;
  };

  testScript = ''
    import json
    import time

    URL = "${dbUrl}"
    OBJECTS = "${objects}"
    INPUTS = ${toString inputs}
    CLI = (
        "runuser -u task-pipeline -- env TASK_PIPELINE_DB_PASSWORD_FILE=/etc/tp-db-password "
        f"task-pipeline -db {URL} --objects {OBJECTS}"
    )


    def done_count(doc, step):
        """The `done` count of STEP in `status --json`, whatever its exact shape."""
        if isinstance(doc, dict):
            if step in doc and isinstance(doc[step], dict) and isinstance(doc[step].get("done"), int):
                return doc[step]["done"]
            if step in (doc.get("name"), doc.get("step")) and isinstance(doc.get("done"), int):
                return doc["done"]
            values = doc.values()
        elif isinstance(doc, list):
            values = doc
        else:
            return 0
        return max([done_count(v, step) for v in values] + [0])


    # the database and the export first: the workers need both when they start
    db.start()
    db.wait_for_unit("postgresql.service")
    db.wait_for_unit("postgresql-setup.service")
    db.wait_for_unit("nfs-server.service")
    db.wait_for_unit("network-online.target")

    worker1.start()
    worker2.start()
    for w in (worker1, worker2):
        w.wait_for_unit("mnt-objects.mount")
        w.wait_for_unit("task-pipeline.service")

    with subtest("the unit gets the password as a credential, not in its environment"):
        env = worker1.succeed("systemctl show -p Environment --value task-pipeline")
        assert "TASK_PIPELINE_DB_PASSWORD_FILE=" in env, env
        assert "${dbPassword}" not in env, env
        assert "/etc/tp-db-password" not in env, env

    with subtest("inputs submitted on one worker are processed by both"):
        worker1.succeed(
            "mkdir -p /tmp/in && for i in $(seq 1 %d); do echo input $i > /tmp/in/in$i.txt; done" % INPUTS
        )
        # each daemon registers the manifest just after it starts: retry until it has
        worker1.wait_until_succeeds(f"{CLI} submit upper /tmp/in/*.txt", timeout=60)
        deadline = time.monotonic() + 180
        while True:
            status = json.loads(worker2.succeed(f"{CLI} status --json"))
            if done_count(status, "upper") >= INPUTS:
                break
            if time.monotonic() > deadline:
                raise Exception(f"not all {INPUTS} inputs done: {status}")
            time.sleep(1)
        for w in ("worker1", "worker2"):
            # outputs begin with the name of the host that made them
            worker1.succeed(f"grep -rqx {w} {OBJECTS}")
        worker2.succeed(f"grep -rqx 'INPUT {INPUTS}' {OBJECTS}")

    with subtest("both workers stop cleanly"):
        for w in (worker1, worker2):
            w.succeed("systemctl stop task-pipeline")
            w.succeed("systemctl show -p Result --value task-pipeline | grep -qx success")
  '';
}
