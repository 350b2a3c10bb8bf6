# The corral CLI and library, built from this checkout with nixpkgs' Python.
# On Linux the OCI runtimes it drives are put on its PATH.
{
  lib,
  stdenv,
  python3Packages,
  crun,
  runc,
  gvisor,
  catatonit,
}:
let
  root = ../..;
  project = (builtins.fromTOML (builtins.readFile (root + "/pyproject.toml"))).project;
in
python3Packages.buildPythonApplication {
  pname = project.name;
  inherit (project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/pyproject.toml")
      (root + "/README.md")
      (root + "/src")
    ];
  };

  build-system = [ python3Packages.hatchling ];
  dependencies = with python3Packages; [
    pydantic
    typer
    rich
    sqlalchemy
    alembic
  ];

  makeWrapperArgs = lib.optionals stdenv.hostPlatform.isLinux [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      crun
      runc
      gvisor
      catatonit
    ])
  ];

  # The test-suite needs root and real runtimes: `corral-check` runs it on a host.
  doCheck = false;
  pythonImportsCheck = [ "corral" ];

  meta = {
    inherit (project) description;
    license = lib.licenses.asl20;
    mainProgram = "corral";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
