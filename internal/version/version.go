// Package version is the release of the running binary, which also tags
// the container images built from it: manifests that trellis install and
// trellis inject write name the images of their own release.
package version

// Version is set at release builds with
// -ldflags "-X github.com/trellis-mesh/trellis/internal/version.Version=v0.1.0".
var Version = "dev"

// Registry is where release images are pushed.
const Registry = "ghcr.io/trellis-mesh"

// ProxyImage is this release's trellis-proxy image.
func ProxyImage() string { return Registry + "/trellis-proxy:" + Version }

// ControlPlaneImage is this release's trellis image.
func ControlPlaneImage() string { return Registry + "/trellis:" + Version }
