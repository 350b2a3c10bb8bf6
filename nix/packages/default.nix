# packages.<system>: `corral`, and for every template of nix/templates.nix a
# `<name>-oci` image (dockerTools, via nix/modules/sandbox/oci.nix) and a
# `<name>-microvm` runner (a microvm.nix guest). The attribute names come from
# nix/lib alone: listing them touches neither nixpkgs nor microvm.nix.
{
  system,
  nixpkgs,
  microvm,
}:
let
  corral = import ../lib;
  pkgs = nixpkgs.legacyPackages.${system};
  corralPackage = pkgs.callPackage ./corral.nix { };

  ociImage =
    entry:
    (pkgs.lib.evalModules {
      modules = [
        ../modules/sandbox/options.nix
        ../modules/sandbox/oci.nix
        {
          _module.args.pkgs = pkgs;
          corral.sandbox.template = entry.path;
        }
      ];
    }).config.corral.sandbox.oci.image;

  microvmRunner =
    entry:
    (nixpkgs.lib.nixosSystem {
      inherit system;
      modules = [
        microvm.nixosModules.microvm
        ../modules/sandbox.nix
        { corral.sandbox.template = entry.path; }
      ];
    }).config.microvm.declaredRunner;

  perTemplate =
    suffix: build:
    builtins.listToAttrs (
      map (name: {
        name = "${name}-${suffix}";
        value = build corral.templates.${name};
      }) corral.templateNames
    );
in
{
  corral = corralPackage;
  default = corralPackage;
}
// perTemplate "oci" ociImage
// perTemplate "microvm" microvmRunner
