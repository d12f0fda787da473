# The runner package of an mvmm microVM: what /var/lib/microvms/<name>/current points to.
#
# It has the layout microvm.nix's host module and `microvm` command expect of a runner
# (bin/microvm-run, bin/microvm-shutdown, the guest's binScripts such as tap-up and
# virtiofsd-run, share/microvm/{tap-interfaces,virtiofs/<tag>/{socket,source},system}) and, for
# `mvmm supervise <name>` (resources/systemd/mvmm@.service), vm.json at its top level.
#
# microvm.nix builds that package itself only for the hypervisors in its own list, so module.nix
# calls this instead for `microvm.hypervisor = "mvmm"`.
{ pkgs
, microvmConfig
, toplevel ? null
}:

let
  cfg = microvmConfig;
  inherit (cfg) hostName;
  runner = import ./runner.nix { inherit pkgs microvmConfig; };

  shellQuote = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
  concatMap = f: list: builtins.concatStringsSep "" (map f list);

  # Volumes with autoCreate (microvm.nix's default) are made on first start: a sparse file of
  # `size` MiB with a file system, as microvm.nix does for its own runners. The paths are the
  # absolute ones vm.json names.
  mkfsPackage = {
    ext2 = "e2fsprogs"; ext3 = "e2fsprogs"; ext4 = "e2fsprogs";
    xfs = "xfsprogs"; btrfs = "btrfs-progs"; vfat = "dosfstools";
  };
  labelFlag = { ext2 = "-L"; ext3 = "-L"; ext4 = "-L"; xfs = "-L"; btrfs = "-L"; vfat = "-n"; };
  autoVolumes = builtins.filter (v: v.autoCreate or true) (cfg.volumes or [ ]);
  createVolume = v:
    let
      fsType = v.fsType or "ext4";
      label = v.label or null;
      path = shellQuote (runner.absolutePath v.image);
    in
    if !(mkfsPackage ? ${fsType})
    then throw "microvm.volumes: ${v.image}: autoCreate cannot make fsType ${fsType}; use ext4, xfs, btrfs or vfat, or create the image yourself (autoCreate = false)"
    else if !(v ? size)
    then throw "microvm.volumes: ${v.image}: give a size (MiB) or set autoCreate = false"
    else ''
      if [ ! -e ${path} ]; then
        mkdir -p "$(dirname ${path})"
        truncate -s ${toString v.size}M ${path}
        PATH=${pkgs.${mkfsPackage.${fsType}}}/bin:$PATH mkfs.${fsType} \
          ${if label != null then "${labelFlag.${fsType}} ${shellQuote label}" else ""} \
          ${builtins.concatStringsSep " " (map shellQuote (v.mkfsExtraArgs or [ ]))} ${path}
      fi
    '';
  createVolumes = ''
    set -euo pipefail
    PATH=${pkgs.coreutils}/bin:$PATH
  '' + concatMap createVolume autoVolumes;

  procName = if cfg.prettyProcnames or true then "exec -a ${shellQuote "microvm@${hostName}"}" else "exec";

  binScripts = (cfg.binScripts or { })
    // {
    microvm-run = ''
      set -euo pipefail
      ${runner.preStart}
      ${if autoVolumes != [ ] then "${scripts.create-volumes}" else ""}
      ${procName} ${runner.command}
    '';
  }
    // (if autoVolumes != [ ] then { create-volumes = createVolumes; } else { })
    // (if runner.canShutdown then { microvm-shutdown = runner.shutdownCommand; } else { });

  scripts = builtins.mapAttrs
    (name: text: pkgs.writeShellScript "microvm-${hostName}-${name}" text)
    binScripts;

  tapIds = map (i: i.id) (builtins.filter (i: i.type == "tap") (cfg.interfaces or [ ]));
  virtiofsShares = builtins.filter (s: (s.proto or "9p") == "virtiofs") (cfg.shares or [ ]);
in
pkgs.runCommand "microvm-mvmm-${hostName}"
{
  meta.mainProgram = "microvm-run";
  passthru = {
    inherit (runner) canShutdown supportsNotifySocket tapMultiQueue vmConfig configFile;
    inherit scripts;
    hypervisor = "mvmm";
  };
} (''
  mkdir -p $out/bin $out/share/microvm
  ln -s ${runner.configFile} $out/vm.json
''
+ concatMap (name: "ln -s ${scripts.${name}} $out/bin/${name}\n") (builtins.attrNames scripts)
+ (if toplevel != null && (cfg.systemSymlink or true) then "ln -s ${toplevel} $out/share/microvm/system\n" else "")
+ "echo vnet_hdr > $out/share/microvm/tap-flags\n"
+ concatMap (id: "echo ${shellQuote id} >> $out/share/microvm/tap-interfaces\n") tapIds
+ concatMap
  (s:
    let dir = "\"$out/share/microvm/virtiofs/\"${shellQuote s.tag}"; in ''
      mkdir -p ${dir}
      echo ${shellQuote s.socket} > ${dir}/socket
      echo ${shellQuote s.source} > ${dir}/source
    '')
  virtiofsShares)
