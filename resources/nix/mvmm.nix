# The mvmm package, for `pkgs.callPackage ./resources/nix/mvmm.nix { }`: bin/mvmm and the
# systemd unit lib/systemd/system/mvmm@.service, whose ExecStart points into the package and
# names nixpkgs' virtiofsd for the supervisor (a NixOS unit's PATH has no virtiofsd).
#
# Not built by this repository's CI (no nixpkgs offline there); tests/packaging_nix.rs only parses
# it. The tests boot VMs (/dev/kvm) and install Debian packages, so they are not run here:
# resources/test-all.sh runs them.
{ lib, rustPlatform, virtiofsd }:

let
  root = ../..;
  cargoToml = builtins.fromTOML (builtins.readFile (root + "/Cargo.toml"));
in
rustPlatform.buildRustPackage {
  pname = "mvmm";
  inherit (cargoToml.package) version;

  # The sources without build outputs and VCS data.
  src = lib.cleanSourceWith {
    src = lib.cleanSource root;
    filter = path: type: !(type == "directory" && builtins.baseNameOf path == "target");
  };
  cargoLock.lockFile = root + "/Cargo.lock";

  # build.rs compiles the freestanding test guest with gcc and objcopy, both in stdenv. The cc
  # wrapper's hardening flags (PIE, stack protector, fortify) do not belong in it; mvmm's own
  # hardening comes from rustc (PIE, full RELRO), not from these flags.
  hardeningDisable = [ "all" ];
  doCheck = false;

  postInstall = ''
    install -Dm0644 resources/systemd/mvmm@.service $out/lib/systemd/system/mvmm@.service
    substituteInPlace $out/lib/systemd/system/mvmm@.service \
      --replace-fail /usr/local/bin/mvmm $out/bin/mvmm \
      --replace-fail "supervise %i" "supervise %i --virtiofsd ${virtiofsd}/bin/virtiofsd"
  '';

  meta = {
    description = "A minimal, fast, sandboxed KVM virtual machine monitor for NixOS microVMs";
    license = lib.licenses.asl20;
    platforms = [ "x86_64-linux" ];
    mainProgram = "mvmm";
  };
}
