// Command composeenv backs `make compose-images`, `make compose-up` and
// `make compose-down`: it starts ferry's own Docker Engine when none runs
// (test/dockerenv), builds the example's images without pulling anything,
// builds Docker Compose, and brings examples/compose up or down.
//
//	composeenv images   # engine + images
//	composeenv up       # engine + images + compose up, waits for the mesh
//	composeenv down     # compose down; stops the engine if `images` or `up` started it
//	composeenv env      # prints the DOCKER_HOST and compose command to use
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/test/dockerenv"
	"github.com/ferrymesh/ferry/test/testbed"
)

// Project is the compose project name the Makefile uses (compose.yaml's).
const Project = "ferry-example"

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: composeenv images|up|down|env")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "composeenv:", err)
		os.Exit(1)
	}
}

func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func run(ctx context.Context, cmd string) error {
	root, err := testbed.RepoRoot()
	if err != nil {
		return err
	}
	file := filepath.Join(root, "examples", "compose", "compose.yaml")
	marker := filepath.Join("/run/ferry-docker", "started-by-make")
	switch cmd {
	case "env":
		bin := filepath.Join(root, ".cache", "bin", "docker-compose")
		fmt.Printf("export DOCKER_HOST=%s\nalias compose='%s -f %s'\n", dockerenv.Host, bin, file)
		return nil
	case "down":
		if dockerenv.RunningPID() == 0 {
			logf("composeenv: ferry's engine is not running; nothing to do")
			return nil
		}
		d, err := dockerenv.Start(ctx, root, logf)
		if err != nil {
			return err
		}
		bin, err := dockerenv.ComposeBinary(ctx, root, logf)
		if err != nil {
			return err
		}
		c := &dockerenv.Compose{D: d, Binary: bin, File: file, Project: Project}
		if out, err := c.Run(ctx, "down", "--remove-orphans", "--timeout", "5"); err != nil {
			return err
		} else {
			fmt.Print(out)
		}
		if _, err := os.Stat(marker); err == nil {
			left, _ := d.Output(ctx, "ps", "-aq")
			if strings.TrimSpace(left) != "" {
				logf("composeenv: other containers remain; leaving the engine running")
				return nil
			}
			os.Remove(marker)
			logf("composeenv: stopping the engine that make compose-images or compose-up started")
			return dockerenv.StopPID(dockerenv.RunningPID())
		}
		return nil
	case "images", "up":
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
	begin := time.Now()
	d, err := dockerenv.Start(ctx, root, logf)
	if err != nil {
		return err
	}
	if d.Started() {
		os.WriteFile(marker, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
	}
	consul, err := testbed.Consul()
	if err != nil {
		return err
	}
	if err := d.BuildImages(ctx, consul, logf); err != nil {
		return err
	}
	for _, img := range []string{dockerenv.SidecarImage, dockerenv.InitImage, dockerenv.AppImage, dockerenv.ConsulImage} {
		if n, err := d.ImageSize(ctx, img); err == nil {
			logf("composeenv: %-30s %s", img, dockerenv.FormatSize(n))
		}
	}
	if cmd == "images" {
		return nil
	}
	bin, err := dockerenv.ComposeBinary(ctx, root, logf)
	if err != nil {
		return err
	}
	c := &dockerenv.Compose{D: d, Binary: bin, File: file, Project: Project}
	if _, err := c.Run(ctx, "up", "--detach", "--remove-orphans"); err != nil {
		return err
	}
	logf("composeenv: up in %v. Try:", time.Since(begin).Round(time.Second))
	logf("  curl http://127.0.0.1:8080/                    # frontend -> ferry -> mTLS -> ferry -> backend")
	logf("  curl http://198.19.42.10:19000/metrics         # the frontend sidecar's metrics")
	logf("  Consul UI: http://127.0.0.1:8500/ui")
	logf("  eval \"$(go run ./test/cmd/composeenv env)\"; compose ps")
	return nil
}
