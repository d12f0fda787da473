# NixOS module for microVM guests: adds "mvmm" to microvm.nix's `microvm.hypervisor` choices.
#
# Import it next to microvm.nix's guest module (microvm.nixosModules.microvm) and set
#   microvm.hypervisor = "mvmm";
#   microvm.mvmm.package = <the mvmm package>;
# microvm.nix picks each hypervisor's runner from its own lib/runners/, which has no mvmm, so
# this module does the two things that list would: it extends the option's enum (NixOS merges
# enum declarations of the same option) and defines microvm.runner.mvmm, which
# microvm.declaredRunner then selects like any other runner.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
in
{
  options.microvm = {
    hypervisor = mkOption {
      type = types.enum [ "mvmm" ];
    };

    mvmm = {
      package = mkOption {
        type = types.nullOr types.package;
        default = pkgs.mvmm or null;
        defaultText = lib.literalExpression "pkgs.mvmm or null";
        description = "The mvmm package whose bin/mvmm runs the VM.";
      };

      machineId = mkOption {
        type = types.nullOr (types.strMatching "[0-9a-f]{32}");
        default = null;
        example = "5c2a9b0e7d3f4e1a8b6c0d9e8f7a6b5c";
        description = ''
          The guest's machine id (as in /etc/machine-id). mvmm hands it to the guest as its
          SMBIOS system UUID, from which systemd takes the machine id on first boot; with a
          `journal` share, `mvmm supervise` links /var/log/journal/<id> to it so
          `journalctl -m` on the host shows the guest's journal.
        '';
      };

      shutdownTimeoutSecs = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = ''
          How long mvmm waits for the guest to power off after the power button is pressed
          (vm.json machine.shutdown_timeout_secs; null: mvmm's default, 30). Keep the
          systemd unit's TimeoutStopSec longer.
        '';
      };

      workDir = mkOption {
        type = types.nullOr types.str;
        default = "/var/lib/microvms/${config.networking.hostName}";
        defaultText = lib.literalExpression ''"/var/lib/microvms/''${config.networking.hostName}"'';
        description = ''
          Directory that relative volume images and sockets are relative to (microvm.nix's
          runners use the working directory, which microvm.nix's host module sets to
          /var/lib/microvms/<name>). vm.json lives in the store, so mvmm gets absolute
          paths. null keeps them relative, which mvmm resolves against the store: only for
          configs without relative paths.
        '';
      };

      extraConfig = mkOption {
        type = types.attrsOf types.anything;
        default = { };
        example = { kvm = "fd:3"; };
        description = "Top-level vm.json keys added to (or replacing) the generated ones.";
      };
    };
  };

  config = lib.mkIf (config.microvm.guest.enable or true) {
    microvm.runner.mvmm = import ./package.nix {
      inherit pkgs;
      microvmConfig = config.microvm // {
        inherit (config.networking) hostName;
        hypervisor = "mvmm";
      };
      toplevel = config.system.build.toplevel;
    };
  };
}
