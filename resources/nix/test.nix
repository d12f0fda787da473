# Evaluates the mvmm runner (runner.nix, package.nix) with stand-ins for nixpkgs and for
# microvm.nix's `microvmConfig`, so it can be checked offline with nothing but nix-instantiate:
#
#   nix-instantiate --store dummy:// --eval --strict --json resources/nix/test.nix --arg case null
#       the results tests/packaging_nix.rs compares with test.expected.json
#   ... --argstr case <name>
#       one case alone; the `rejects` cases fail with the runner's message
#   ... --argstr case boot --argstr bootDir D --argstr storeDir S --argstr mvmmPackage P
#       the runner package of a VM whose files are under D (vmlinux, initrd, store.img,
#       journal/), with its stand-in store paths under S and P/bin/mvmm as mvmm:
#       tests/packaging_nix.rs writes the files, runs the package's build script and boots the test
#       guest with its bin/microvm-run. Case `hang` is the same VM with a guest that hangs, for
#       bin/microvm-shutdown.
#
# The stand-ins are plain attribute sets: a "derivation" is its name, a fake store path
# (outPath, so string interpolation works) and what it was made from (text, script).
{ case ? null
, bootDir ? "/tmp/mvmm-nix-boot"
, storeDir ? "/nix/store"
, mvmmPackage ? null
}:

let
  fakeHash = "0123456789abcdfghijklmnpqrsvwxyz";
  drv = name: attrs: attrs // { inherit name; outPath = "${storeDir}/${fakeHash}-${name}"; };

  pkgs = {
    system = "x86_64-linux";
    stdenv.hostPlatform.system = "x86_64-linux";
    writeText = name: text: drv name { inherit text; };
    writeShellScript = name: text: drv name { text = "#!/bin/bash\n" + text; };
    runCommand = name: env: script: drv name (env // { inherit script; });
    coreutils = drv "coreutils-9.5" { };
    e2fsprogs = drv "e2fsprogs-1.47.1" { };
    xfsprogs = drv "xfsprogs-6.9.0" { };
    btrfs-progs = drv "btrfs-progs-6.10" { };
    dosfstools = drv "dosfstools-4.2" { };
  };

  # What microvm.nix's guest module puts in config.microvm (plus hostName), for a VM "web" with
  # the store on a disk, a volume of each kind, a tap and a journal share.
  web = {
    hostName = "web";
    hypervisor = "mvmm";
    vcpu = 2;
    mem = 1024;
    kernel = drv "linux-6.6.52" { dev = drv "linux-6.6.52-dev" { }; };
    initrdPath = "/nix/store/${fakeHash}-initrd-linux-6.6.52/initrd";
    kernelParams = [ "boot.shell_on_fail" "init=/nix/store/${fakeHash}-nixos-system-web/init" ];
    storeOnDisk = true;
    storeDisk = drv "microvm-store-disk.erofs" { };
    volumes = [
      { image = "var.img"; mountPoint = "/var"; size = 256; autoCreate = true; fsType = "ext4"; label = "var"; readOnly = false; serial = null; direct = false; mkfsExtraArgs = [ ]; }
      { image = "/dev/vg0/web-data"; mountPoint = "/data"; size = 0; autoCreate = false; fsType = "ext4"; label = null; readOnly = true; serial = "web-data"; direct = true; mkfsExtraArgs = [ ]; }
    ];
    interfaces = [ { type = "tap"; id = "vm-web"; mac = "02:00:00:00:00:01"; } ];
    shares = [
      { tag = "journal"; source = "/var/lib/microvms/web/journal"; mountPoint = "/var/log/journal"; proto = "virtiofs"; socket = "journal.sock"; securityModel = "none"; }
    ];
    socket = "web.sock";
    user = null;
    cpu = null;
    preStart = "";
    balloon = false;
    initialBalloonMem = 0;
    hotplugMem = 0;
    hotpluggedMem = 0;
    hugepageMem = false;
    devices = [ ];
    graphics.enable = false;
    vsock.cid = null;
    prettyProcnames = true;
    systemSymlink = true;
    binScripts = {
      tap-up = "ip tuntap add name 'vm-web' mode tap user 'microvm' vnet_hdr\n";
      tap-down = "ip link delete 'vm-web'\n";
    };
    virtiofsd = { threadPoolSize = "`nproc`"; inodeFileHandles = "mandatory"; extraArgs = [ "--allow-mmap" ]; };
    mvmm = {
      package = drv "mvmm-0.1.0" { };
      machineId = "5c2a9b0e7d3f4e1a8b6c0d9e8f7a6b5c";
      shutdownTimeoutSecs = 20;
    };
  };

  # The host's /nix/store as a share instead of a disk (storeOnDisk false), no volumes, no
  # control socket, no machine id, relative paths kept.
  minimal = web // {
    hostName = "mini";
    vcpu = 1;
    mem = 256;
    storeOnDisk = false;
    volumes = [ ];
    interfaces = [ ];
    shares = [ { tag = "ro-store"; source = "/nix/store"; mountPoint = "/nix/.ro-store"; proto = "virtiofs"; socket = "/run/mini/store.sock"; } ];
    socket = null;
    virtiofsd = { threadPoolSize = 4; inodeFileHandles = null; extraArgs = [ ]; };
    mvmm = { package = web.mvmm.package; workDir = null; };
  };

  # Every file under bootDir; the test guest boots from it.
  boot = web // {
    hostName = "boot";
    vcpu = 1;
    mem = 64;
    kernel = { dev = bootDir; };
    initrdPath = "${bootDir}/initrd";
    kernelParams = [ ];
    storeDisk = "${bootDir}/store.img";
    volumes = [ { image = "var.img"; mountPoint = "/var"; size = 16; autoCreate = true; fsType = "ext4"; label = "var"; readOnly = false; serial = "var"; direct = false; mkfsExtraArgs = [ "-q" ]; } ];
    interfaces = [ { type = "tap"; id = "mvmm-nix0"; mac = "02:00:00:00:00:02"; } ];
    shares = [ { tag = "journal"; source = "${bootDir}/journal"; mountPoint = "/var/log/journal"; proto = "virtiofs"; socket = "journal.sock"; } ];
    socket = "api.sock";
    binScripts = { };
    mvmm = web.mvmm // {
      workDir = bootDir;
      shutdownTimeoutSecs = 1;
    } // (if mvmmPackage != null then { package = { outPath = mvmmPackage; }; } else { });
  };
  hang = boot // { hostName = "hang"; kernelParams = [ "test=hang" ]; socket = "hang.sock"; };

  runner = microvmConfig: import ./runner.nix { inherit pkgs microvmConfig; };
  package = microvmConfig: import ./package.nix {
    inherit pkgs microvmConfig;
    toplevel = drv "nixos-system-${microvmConfig.hostName}" { };
  };

  webRunner = runner web;
  webPackage = package web;

  # A runner package as tests/packaging_nix.rs builds it: the files of its inputs (text and mode),
  # then its build script with $out set.
  buildPlan = microvmConfig:
    let
      pkg = package microvmConfig;
      file = executable: d: { path = d.outPath; inherit (d) text; inherit executable; };
    in
    {
      inputs = [ (file false pkg.passthru.configFile) ]
        ++ map (file true) (builtins.attrValues pkg.passthru.scripts);
      inherit (pkg) script;
      out = pkg.outPath;
      vmJson = pkg.passthru.vmConfig;
    };

  # Configs the runner must refuse, each with a clear message (the test checks the messages).
  rejects = {
    ninep = web // { shares = [ (builtins.head web.shares // { proto = "9p"; }) ]; };
    balloon = web // { balloon = true; };
    hotplug = web // { hotplugMem = 1024; };
    devices = web // { devices = [ { bus = "pci"; path = "0000:01:00.0"; } ]; };
    macvtap = web // { interfaces = [ { type = "macvtap"; id = "vm-web"; mac = "02:00:00:00:00:01"; } ]; };
    serial = web // { volumes = [ (builtins.head web.volumes // { serial = "a-serial-of-21-bytes!"; }) ]; };
    tapname = web // { interfaces = [ { type = "tap"; id = "a-tap-name-of-16b"; mac = "02:00:00:00:00:01"; } ]; };
    machineid = web // { mvmm = web.mvmm // { machineId = "not-a-machine-id"; }; };
    aarch64 = web;
  };
  rejectPkgs = name:
    if name == "aarch64"
    then pkgs // { system = "aarch64-linux"; stdenv.hostPlatform.system = "aarch64-linux"; }
    else pkgs;
  rejected = name: (import ./runner.nix { pkgs = rejectPkgs name; microvmConfig = rejects.${name}; }).vmConfig;

  # module.nix with a stand-in for nixpkgs' lib: the option it declares and the runner package
  # it defines (NixOS's module system merges both with microvm.nix's own).
  fakeLib = {
    mkOption = option: option;
    mkIf = cond: value: if cond then value else { };
    literalExpression = text: text;
    types = {
      enum = values: { enum = values; };
      nullOr = type: { nullOr = type; };
      attrsOf = type: { attrsOf = type; };
      strMatching = re: { strMatching = re; };
      package = "package";
      str = "str";
      anything = "anything";
      ints.unsigned = "unsigned";
    };
  };
  moduleResult = import ./module.nix {
    lib = fakeLib;
    inherit pkgs;
    config = {
      networking.hostName = "web";
      system.build.toplevel = drv "nixos-system-web" { };
      microvm = web // { guest.enable = true; };
    };
  };

  results = {
    # microvm.nix's runner contract.
    contract = {
      inherit (webRunner) command canShutdown preStart supportsNotifySocket tapMultiQueue requiresMacvtapAsFds;
      shutdownCommandCallsCtl = builtins.match ".*mvmm' ctl --socket \"\\$sock\" shutdown.*" webRunner.shutdownCommand != null;
      userRefused = (builtins.tryEval webRunner.command).success
        && !(builtins.tryEval (runner (web // { user = "microvm"; })).command).success;
      noSocketCannotShutdown = !(runner minimal).canShutdown;
    };
    # The generated vm.json, and the store file holding it.
    vmJson = webRunner.vmConfig;
    configFile = {
      inherit (webRunner.configFile) name;
      sameAsVmJson = builtins.fromJSON webRunner.configFile.text == webRunner.vmConfig;
    };
    minimalVmJson = (runner minimal).vmConfig;
    # The runner package: its passthru (read by microvm.nix's host module) and bin/ scripts.
    package = {
      inherit (webPackage) name;
      passthru = { inherit (webPackage.passthru) canShutdown supportsNotifySocket tapMultiQueue hypervisor; };
      mainProgram = webPackage.meta.mainProgram;
      bin = builtins.attrNames webPackage.passthru.scripts;
      microvmRun = webPackage.passthru.scripts.microvm-run.text;
    };
    module = {
      hypervisorChoices = moduleResult.options.microvm.hypervisor.type.enum;
      inherit (moduleResult.options.microvm.mvmm.workDir) default;
      runner = moduleResult.config.microvm.runner.mvmm.name;
      sameVmJson = moduleResult.config.microvm.runner.mvmm.passthru.vmConfig == webRunner.vmConfig;
    };
    # Each refused config: false when evaluation failed, as it must.
    rejectsEvaluate = builtins.mapAttrs (name: _: (builtins.tryEval (builtins.toJSON (rejected name))).success) rejects;
  };

  cases = builtins.mapAttrs (name: _: rejected name) rejects // {
    boot = buildPlan boot;
    hang = buildPlan hang;
  };
in
if case == null then results
else cases.${case} or (throw "test.nix: no case ${case}; cases: ${builtins.concatStringsSep ", " (builtins.attrNames cases)}")
