# NixOS VM test of services.task-pipeline, run by `nix flake check` (needs KVM):
#   nix build .#checks.x86_64-linux.vm-test -L
# `machine`: a static user, a mutable manifest in /etc; submit an input, see it done,
# edit the manifest, `systemctl reload`, see the new step run, stop cleanly.
# `dynamic`: DynamicUser with the manifest written as Nix `settings`.
{ self }:
let
  manifestV1 = ''
    [pipeline]
    workdir = "/var/lib/task-pipeline"

    [[step]]
    name = "upper"
    script = "tr a-z A-Z < \"$INPUT_FILE\" > \"$OUTPUT_DIR/done\""
  '';
  # v2 adds a step; only a reload (SIGHUP) makes the running daemon see it.
  manifestV2 = manifestV1 + ''

    [[step]]
    name = "shout"
    script = "tr a-z b-za < \"$INPUT_FILE\" > \"$OUTPUT_DIR/done\""
  '';
in
{
  name = "task-pipeline";

  nodes = {
    machine = {
      imports = [ self.nixosModules.default ];
      services.task-pipeline = {
        enable = true;
        user = "task-pipeline";
        manifest = "/etc/pipeline/manifest.toml";
        parallel = 2;
      };
      environment.etc = {
        # mode makes a real (editable) file instead of a link into the store
        "pipeline/manifest.toml" = {
          text = manifestV1;
          mode = "0644";
        };
        "pipeline/manifest-v2.toml".text = manifestV2;
        "pipeline/input.txt".text = "hello\n";
      };
    };

    dynamic = {
      imports = [ self.nixosModules.default ];
      services.task-pipeline = {
        enable = true;
        settings.step = [
          {
            name = "upper";
            script = ''tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done"'';
            retries = 1;
            env.LANG = "C";
          }
        ];
      };
    };
  };

  testScript = ''
    import json
    import time

    DB = "/var/lib/task-pipeline"
    CLI = "runuser -u task-pipeline -- task-pipeline"


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


    def wait_done(step, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            status = json.loads(machine.succeed(f"{CLI} status -db {DB} --json"))
            if done_count(status, step) >= 1:
                return
            if time.monotonic() > deadline:
                raise Exception(f"step {step} not done after {timeout}s: {status}")
            time.sleep(1)


    start_all()

    with subtest("the service starts hardened"):
        machine.wait_for_unit("task-pipeline.service")
        show = machine.succeed(
            "systemctl show task-pipeline -p ProtectSystem -p NoNewPrivileges -p User"
            " -p ProtectClock -p ProtectProc -p ProcSubset -p MemoryDenyWriteExecute"
        )
        for line in ("ProtectSystem=strict", "NoNewPrivileges=yes", "User=task-pipeline", "ProtectClock=yes",
                     "ProtectProc=invisible", "ProcSubset=pid", "MemoryDenyWriteExecute=yes"):
            assert line in show, show
        assert "network-online.target" in machine.succeed("systemctl show -p After --value task-pipeline")

    with subtest("a submitted input is processed"):
        # the daemon registers the manifest just after it starts: retry until it has
        machine.wait_until_succeeds(f"{CLI} submit -db {DB} upper /etc/pipeline/input.txt", timeout=30)
        wait_done("upper")
        machine.succeed(f"grep -rqx HELLO {DB}/objects")

    with subtest("an edited manifest is picked up on reload"):
        pid = machine.succeed("systemctl show -p MainPID --value task-pipeline").strip()
        machine.succeed("cp /etc/pipeline/manifest-v2.toml /etc/pipeline/manifest.toml")
        machine.succeed("systemctl reload task-pipeline")
        machine.wait_until_succeeds(f"{CLI} submit -db {DB} shout /etc/pipeline/input.txt", timeout=30)
        wait_done("shout")
        machine.succeed(f"grep -rqx ifmmp {DB}/objects")
        assert machine.succeed("systemctl show -p MainPID --value task-pipeline").strip() == pid, "reload restarted the daemon"

    with subtest("SIGTERM drains and exits cleanly"):
        machine.succeed("systemctl stop task-pipeline")
        machine.succeed("systemctl show -p Result --value task-pipeline | grep -qx success")

    with subtest("settings in Nix, DynamicUser"):
        dynamic.wait_for_unit("task-pipeline.service")
        dynamic.succeed("systemctl show -p DynamicUser --value task-pipeline | grep -qx yes")
        dynamic.succeed("task-pipeline validate -manifest /etc/task-pipeline/manifest.toml")
  '';
}
