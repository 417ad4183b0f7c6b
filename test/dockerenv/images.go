package dockerenv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The example's images (examples/compose/compose.yaml names them).
const (
	SidecarImage = "ferry:sidecar"
	InitImage    = "ferry:init"
	AppImage     = "ferry-example/app:dev"
	ConsulImage  = "ferry-example/consul:1.14.11"
)

// BuildImages builds ferry's two images from the project's Dockerfile
// (targets init and sidecar), the example app (built on the host) and the
// example's Consul from consulBinary, after making any missing base image locally. Builds use the
// classic builder (DOCKER_BUILDKIT=0: BuildKit would fetch the Dockerfile
// frontend named by its syntax line from a registry) and the host network,
// so the build stage reaches the Go module proxy and the init stage reaches
// the Debian mirror exactly as the host does; nothing is pulled.
func (d *Docker) BuildImages(ctx context.Context, consulBinary string, logf func(string, ...any)) error {
	df := filepath.Join(d.Root, "Dockerfile")
	appDF := filepath.Join(d.Root, "examples", "compose", "images", "app.Dockerfile")
	consulDF := filepath.Join(d.Root, "examples", "compose", "images", "consul.Dockerfile")
	if err := d.EnsureBaseImages(ctx, logf, df, appDF, consulDF); err != nil {
		return err
	}
	version := gitVersion(d.Root)
	builds := []struct {
		tag  string
		args []string
	}{
		{InitImage, []string{"--target", "init", "--build-arg", "VERSION=" + version, "."}},
		{SidecarImage, []string{"--target", "sidecar", "--build-arg", "VERSION=" + version, "."}},
	}
	for _, b := range builds {
		begin := time.Now()
		args := append([]string{"build", "--pull=false", "--force-rm", "--network", "host", "-t", b.tag}, b.args...)
		if err := d.Run(ctx, args...); err != nil {
			return err
		}
		logf("dockerenv: built %s in %v", b.tag, time.Since(begin).Round(100*time.Millisecond))
	}
	begin := time.Now()
	app, err := buildApp(ctx, d.Root)
	if err != nil {
		return err
	}
	defer os.Remove(app)
	if err := d.buildFromBinary(ctx, AppImage, appDF, app, "app"); err != nil {
		return err
	}
	logf("dockerenv: built %s in %v", AppImage, time.Since(begin).Round(100*time.Millisecond))
	begin = time.Now()
	if err := d.buildFromBinary(ctx, ConsulImage, consulDF, consulBinary, "consul"); err != nil {
		return err
	}
	logf("dockerenv: built %s in %v", ConsulImage, time.Since(begin).Round(100*time.Millisecond))
	// Earlier builds' untagged stages pile up in the data root under
	// .cache; the current ones stay as the next build's layer cache.
	if err := d.Run(ctx, "image", "prune", "--force", "--filter", "until=1h"); err != nil {
		logf("dockerenv: %v", err)
	}
	return nil
}

// buildApp builds the example app as a static binary on the host, where the
// Go build cache makes it take seconds.
func buildApp(ctx context.Context, root string) (string, error) {
	out := filepath.Join(root, ".cache", "bin", fmt.Sprintf("example-app-%d", os.Getpid()))
	cmd := command(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, "./examples/compose/app")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("dockerenv: build the example app: %w\n%s", err, b)
	}
	return out, nil
}

// buildFromBinary builds an image from a context holding only one binary,
// as name (hard-linked when it can be, so Consul's 150 MB are not copied).
func (d *Docker) buildFromBinary(ctx context.Context, tag, dockerfile, binary, name string) error {
	parent := filepath.Join(d.Root, ".cache", "docker")
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(parent, "ctx-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	dst := filepath.Join(dir, name)
	if err := os.Link(binary, dst); err != nil {
		if err := copyPath(binary, dst); err != nil {
			return err
		}
	}
	return d.Run(ctx, "build", "--pull=false", "--force-rm", "--network", "host", "-t", tag, "-f", dockerfile, dir)
}

func copyPath(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}

// ImageSize is an image's size in bytes as the engine reports it.
func (d *Docker) ImageSize(ctx context.Context, image string) (int64, error) {
	out, err := d.Output(ctx, "image", "inspect", "--format", "{{.Size}}", image)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(out), 10, 64)
}

// gitVersion is the Makefile's VERSION: git describe, else "dev".
func gitVersion(root string) string {
	cmd := command(context.Background(), "git", "describe", "--tags", "--always", "--dirty")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return "dev"
	}
	return strings.TrimSpace(string(out))
}

// FormatSize prints bytes as MB with one decimal.
func FormatSize(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }
