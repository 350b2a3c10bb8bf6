# nixosModules.sandbox: a Corral template as a NixOS microVM guest and an OCI
# image. Set `corral.sandbox.template = ./my.toml;` (or the options directly);
# `config.corral.sandbox.oci.image` is the image, `config.microvm.declaredRunner`
# the microVM. The flake's wrapper adds microvm.nix's guest module.
{
  imports = [
    ./sandbox/options.nix
    ./sandbox/oci.nix
    ./sandbox/guest.nix
  ];
}
