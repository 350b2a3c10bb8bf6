{
  description = "Corral: sandbox templates as OCI images and microVM guests, Corral hosts, a developer Mac";

  # Pins: flake.lock was written by hand on a machine without network access.
  # nixpkgs, home-manager and nix-darwin are revisions of their 26.05 release
  # branches (July 2026); microvm.nix is a main-branch commit whose narHash Nix
  # records on first fetch. Nothing here has been fetched or built: run
  # `nix flake update` (or `nix flake lock --update-input <name>`) on a machine
  # that reaches GitHub before first use, and review the diff. See nix/README.md.
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      inputs.nixpkgs.follows = "nixpkgs";
      # only its (unused here) graphics overlay needs Spectrum
      inputs.spectrum.follows = "";
    };
    nix-darwin = {
      url = "github:nix-darwin/nix-darwin/nix-darwin-26.05";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    home-manager = {
      url = "github:nix-community/home-manager/release-26.05";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  # Everything that needs no package set is computed from ./nix/lib with builtins
  # only: `lib`, and the attribute names of every output below, evaluate without
  # fetching or importing nixpkgs (tests/test_nix.py checks this with stub inputs).
  outputs =
    inputs@{
      self,
      nixpkgs,
      microvm,
      nix-darwin,
      home-manager,
      ...
    }:
    let
      corral = import ./nix/lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system;
          }) systems
        );
      specialArgs = { inherit inputs; };

      hosts = {
        aws-container-host = {
          system = "x86_64-linux";
          tag = "container";
          modules = [
            self.nixosModules.corral-host
            ./nix/hosts/aws-container-host.nix
          ];
        };
        metal-microvm-host = {
          system = "x86_64-linux";
          tag = "microvm";
          modules = [
            self.nixosModules.corral-host
            ./nix/hosts/metal-microvm-host.nix
          ];
        };
      };

      # Each template as a standalone microVM guest: nixosConfigurations.sandbox-<name>.
      sandboxGuest =
        name:
        nixpkgs.lib.nixosSystem {
          system = "x86_64-linux";
          modules = [
            self.nixosModules.sandbox
            { corral.sandbox.template = corral.templates.${name}.path; }
          ];
        };
    in
    {
      lib = corral;

      overlays.default = final: _prev: { corral = final.callPackage ./nix/packages/corral.nix { }; };

      # corral, <template>-oci, <template>-microvm
      packages = forAllSystems (system: import ./nix/packages { inherit system nixpkgs microvm; });

      nixosModules = {
        sandbox = {
          imports = [
            microvm.nixosModules.microvm
            ./nix/modules/sandbox.nix
          ];
        };
        corral-host = {
          imports = [
            microvm.nixosModules.host
            ./nix/modules/corral-host.nix
          ];
        };
        default = self.nixosModules.corral-host;
      };

      nixosConfigurations =
        builtins.mapAttrs (
          _: host:
          nixpkgs.lib.nixosSystem {
            inherit (host) system modules;
            inherit specialArgs;
          }
        ) hosts
        // builtins.listToAttrs (
          map (name: {
            name = "sandbox-${name}";
            value = sandboxGuest name;
          }) corral.templateNames
        );

      colmena = import ./nix/hive.nix { inherit nixpkgs specialArgs hosts; };

      darwinConfigurations.dev-mac = nix-darwin.lib.darwinSystem {
        inherit specialArgs;
        modules = [
          home-manager.darwinModules.home-manager
          ./nix/hosts/dev-mac.nix
        ];
      };
    };
}
