# The mvmm runner for microvm.nix: the same contract as microvm.nix's lib/runners/<name>.nix.
#
# Called with microvm.nix's `microvmConfig` (config.microvm plus hostName), it returns what
# microvm.nix's runner packaging reads:
#   command          the shell command line microvm-run execs: `mvmm --config <vm.json>`
#   preStart         shell run before it
#   canShutdown      whether shutdownCommand works (needs microvm.socket: mvmm's api_socket)
#   shutdownCommand  presses the guest's power button and waits for mvmm to exit
#   supportsNotifySocket, tapMultiQueue, requiresMacvtapAsFds
# and, for package.nix and the tests, `vmConfig` (the vm.json as an attribute set) and
# `configFile` (that vm.json in the store).
#
# Only builtins are used (no nixpkgs lib), so the file also evaluates with the stand-in pkgs of
# test.nix. Anything mvmm cannot do is a `throw` naming the option to change.
{ pkgs
, microvmConfig
, ...
}:

let
  cfg = microvmConfig;
  mvmmCfg = cfg.mvmm or { };
  inherit (cfg) hostName;

  system = pkgs.stdenv.hostPlatform.system or pkgs.system;

  mvmm =
    if mvmmCfg ? package && mvmmCfg.package != null then mvmmCfg.package
    else pkgs.mvmm or (throw ''
      microvm.mvmm.package is not set and pkgs has no mvmm: set microvm.mvmm.package to the
      mvmm package (see resources/nix/README.md)'');

  # Relative paths in microvm.nix options (volume images, sockets) are relative to the VM's
  # working directory, /var/lib/microvms/<name> under microvm.nix's host module. vm.json is
  # read from the store, so they are made absolute against that directory here.
  workDir = mvmmCfg.workDir or "/var/lib/microvms/${hostName}";
  absolute = p:
    if workDir == null || builtins.substring 0 1 p == "/" then p else "${workDir}/${p}";

  shellQuote = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
  shellArgs = args: builtins.concatStringsSep " " (map shellQuote args);
  byteLength = s: builtins.stringLength s; # Nix strings are byte strings
  optional = cond: value: if cond then [ value ] else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };

  # Unsupported options, as [ { when; why; } ]: the first that applies is thrown.
  unsupported = [
    { when = system != "x86_64-linux"; why = "mvmm runs x86_64-linux guests only (this system is ${system})"; }
    { when = (cfg.cpu or null) != null; why = "microvm.cpu: mvmm does not emulate CPUs (it uses KVM); leave it null"; }
    { when = cfg.balloon or false; why = "microvm.balloon: mvmm has no virtio-balloon device; set it to false"; }
    { when = (cfg.initialBalloonMem or 0) != 0; why = "microvm.initialBalloonMem: mvmm has no virtio-balloon device; set it to 0"; }
    { when = (cfg.hotplugMem or 0) != 0 || (cfg.hotpluggedMem or 0) != 0; why = "microvm.hotplugMem: mvmm has no virtio-mem device; set hotplugMem and hotpluggedMem to 0"; }
    { when = cfg.hugepageMem or false; why = "microvm.hugepageMem: mvmm does not back guest memory with hugepages; set it to false"; }
    { when = (cfg.devices or [ ]) != [ ]; why = "microvm.devices: mvmm has no PCI/USB passthrough; remove the devices"; }
    { when = cfg.graphics.enable or false; why = "microvm.graphics.enable: mvmm has no graphics device; set it to false"; }
    { when = (cfg.vsock.cid or null) != null; why = "microvm.vsock.cid: mvmm has no vsock device yet; set it to null"; }
  ];
  firstUnsupported = builtins.filter (u: u.when) unsupported;
  checked = value:
    if firstUnsupported != [ ]
    then throw "mvmm runner for ${hostName}: ${(builtins.head firstUnsupported).why}"
    else value;

  kernelPath = "${cfg.kernel.dev}/vmlinux"; # NixOS's vmlinux has a PVH note mvmm boots through

  storeDisk = optional (cfg.storeOnDisk or true) {
    path = "${cfg.storeDisk}";
    read_only = true;
  };

  volume = { image, readOnly ? false, serial ? null, direct ? false, ... }:
    if serial != null && (byteLength serial > 20 || byteLength serial == 0)
    then throw "microvm.volumes: the serial \"${serial}\" of ${image} must be 1 to 20 bytes (the virtio-blk ID)"
    else {
      path = absolute image;
      read_only = readOnly;
    }
    // optionalAttrs (serial != null) { inherit serial; }
    // optionalAttrs direct { direct = true; };

  interface = { type, id ? null, mac ? null, ... }:
    if type != "tap"
    then throw "microvm.interfaces: interface ${toString id} has type \"${type}\"; mvmm supports type = \"tap\" only"
    else if id == null || byteLength id > 15
    then throw "microvm.interfaces: the tap name \"${toString id}\" must be 1 to 15 bytes (a Linux interface name)"
    else if mac == null
    then throw "microvm.interfaces: interface ${id} needs a mac"
    else { tap = id; inherit mac; };

  # The virtiofsd options microvm.nix's own virtiofsd-run uses, for `mvmm supervise`, which
  # starts virtiofsd itself (under microvm.nix's host module its virtiofsd-run does).
  virtiofsdCfg = cfg.virtiofsd or { };
  threadPoolSize = virtiofsdCfg.threadPoolSize or null;
  virtiofsdArgs =
    optional (builtins.isInt threadPoolSize) "--thread-pool-size=${toString threadPoolSize}"
    ++ optional ((virtiofsdCfg.inodeFileHandles or null) != null)
      "--inode-file-handles=${virtiofsdCfg.inodeFileHandles}"
    ++ (virtiofsdCfg.extraArgs or [ ]);

  share = { tag, socket ? null, source, proto ? "9p", ... }:
    if proto != "virtiofs"
    then throw "microvm.shares: share ${tag} uses ${proto}; mvmm supports virtio-fs only: set proto = \"virtiofs\""
    else if socket == null
    then throw "microvm.shares: share ${tag} needs a socket"
    else if byteLength tag > 36
    then throw "microvm.shares: the tag \"${tag}\" is longer than 36 bytes"
    else {
      inherit tag source;
      socket = absolute socket;
      virtiofsd = {
        xattr = true;
        posix_acl = true;
      } // optionalAttrs (virtiofsdArgs != [ ]) { extra_args = virtiofsdArgs; };
    };

  machineId = mvmmCfg.machineId or null;
  socket = cfg.socket or null;
  shutdownTimeoutSecs = mvmmCfg.shutdownTimeoutSecs or null;

  vmConfig = checked ({
    kernel = {
      path = kernelPath;
      initrd = cfg.initrdPath;
      cmdline = builtins.concatStringsSep " " ([ "console=ttyS0" "reboot=k" "panic=1" ] ++ cfg.kernelParams);
    };
    machine = {
      vcpus = cfg.vcpu;
      memory_mib = cfg.mem;
    } // optionalAttrs (shutdownTimeoutSecs != null) { shutdown_timeout_secs = shutdownTimeoutSecs; };
    # The store disk is /dev/vda, so microvm.nix's drive letters for the volumes hold.
    disks = storeDisk ++ map volume (cfg.volumes or [ ]);
    net = map interface (cfg.interfaces or [ ]);
    shares = map share (cfg.shares or [ ]);
  }
  // optionalAttrs (socket != null) { api_socket = absolute socket; }
  // optionalAttrs (machineId != null) {
    machine_id =
      if builtins.match "[0-9a-f]{32}" machineId == null
      then throw "microvm.mvmm.machineId \"${machineId}\" is not 32 lowercase hex digits (the format of /etc/machine-id)"
      else machineId;
  }
  // (mvmmCfg.extraConfig or { }));

  configFile = pkgs.writeText "mvmm-${hostName}.json" (builtins.toJSON vmConfig);

  mvmmBin = "${mvmm}/bin/mvmm";

  # How long microvm-shutdown waits for mvmm to exit: the guest's grace period (mvmm's default
  # 30 s) and a margin; after the grace period mvmm stops the VM by itself.
  stopWaitSecs = (if shutdownTimeoutSecs != null then shutdownTimeoutSecs else 30) + 10;
in
{
  inherit vmConfig configFile;
  # For package.nix: where a relative volume image of microvm.nix ends up.
  absolutePath = absolute;

  command =
    if (cfg.user or null) != null
    then throw "microvm.user: mvmm will not change user; run microvm-run as that user, or use mvmm@.service, which runs mvmm as `microvm`"
    else shellArgs [ mvmmBin "--config" configFile ];

  # mvmm replaces a stale api_socket itself.
  preStart = cfg.preStart or "";

  canShutdown = socket != null;

  shutdownCommand =
    if socket == null
    then throw "microvm.socket is null: mvmm needs its api_socket for microvm-shutdown"
    else ''
      sock=${shellQuote (absolute socket)}
      rc=0
      ${shellQuote mvmmBin} ctl --socket "$sock" shutdown >/dev/null || rc=$?
      # 2: nothing listens there, so the VM is not running.
      case $rc in 0) ;; 2) exit 0 ;; *) exit "$rc" ;; esac
      # mvmm removes its socket when it exits; `ctl` says 2 once nothing answers there.
      deadline=$((SECONDS + ${toString stopWaitSecs}))
      while [ "$SECONDS" -lt "$deadline" ]; do
        rc=0
        ${shellQuote mvmmBin} ctl --socket "$sock" status >/dev/null 2>&1 || rc=$?
        [ "$rc" -eq 2 ] && exit 0
        sleep 0.5
      done
      echo "mvmm (${hostName}) did not exit within ${toString stopWaitSecs} s" >&2
      exit 1
    '';

  # Type=notify under microvm.nix's host module would need mvmm itself to notify; the
  # supervisor (mvmm@.service) does that instead.
  supportsNotifySocket = false;
  # One queue pair per interface.
  tapMultiQueue = false;
  requiresMacvtapAsFds = false;
}
