//go:build kovnharness

// Command kovn-harness runs kube-ovn-cni's own iptables/ipset reconciliation (the netfilter part
// of its 3-second gateway pass) against a cluster read from a kubectl-style YAML file, in the
// network namespace it is started in (`ip netns exec NS kovn-harness ...`). It is kube-ovn-ebpf's,
// built inside a copy of Kube-OVN's module by `cargo xtask kube-ovn build`.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/klog/v2"

	"github.com/kubeovn/kube-ovn/pkg/daemon"
	"github.com/kubeovn/kube-ovn/pkg/util"
)

func main() {
	var opts daemon.HarnessOptions
	flag.StringVar(&opts.ClusterFile, "cluster", "", "kubectl-style YAML file of Nodes, Subnets, Services and Pods (re-read when it changes)")
	flag.StringVar(&opts.NodeName, "node-name", "", "the node kube-ovn-cni runs on (NODE_NAME)")
	flag.StringVar(&opts.Protocol, "protocol", "", "IPv4, IPv6 or Dual; default: from the node's "+util.IPAddressAnnotation+" annotation, as kube-ovn-cni")
	flag.StringVar(&opts.ServiceClusterIPRange, "service-cluster-ip-range", "10.96.0.0/12", "kube-ovn-cni's --service-cluster-ip-range")
	flag.StringVar(&opts.ClusterRouter, "cluster-router", util.DefaultVpc, "kube-ovn-cni's --cluster-router")
	flag.BoolVar(&opts.EnableTProxy, "enable-tproxy", false, "kube-ovn-cni's --enable-tproxy")
	flag.StringVar(&opts.NodeIPv4, "node-ipv4", "", "the node's IPv4 for TPROXY --on-ip; default: its InternalIP")
	flag.StringVar(&opts.NodeIPv6, "node-ipv6", "", "the node's IPv6 for TPROXY --on-ip; default: its InternalIP")
	flag.StringVar(&opts.PreroutingDatapath, "prerouting-datapath", "", "iptables or external (patched builds only)")
	once := flag.Bool("once", false, "run one pass and exit (non-zero if it failed)")
	interval := flag.Duration("interval", 3*time.Second, "time between passes (kube-ovn-cni: 3s)")
	passes := flag.Int("passes", 0, "stop after this many passes (0: until SIGTERM/SIGINT)")
	klog.InitFlags(nil)
	flag.Parse()
	// As kube-ovn-cni's ParseFlags: the ipset library logs every set operation at info level.
	logrus.SetLevel(logrus.WarnLevel)
	if opts.ClusterFile == "" || opts.NodeName == "" {
		fmt.Fprintln(os.Stderr, "kovn-harness: --cluster and --node-name are required")
		os.Exit(2)
	}
	if *once {
		*passes = 1
	}
	os.Exit(run(opts, *interval, *passes))
}

func run(opts daemon.HarnessOptions, interval time.Duration, passes int) int {
	h, err := daemon.NewHarness(opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kovn-harness: %v\n", err)
		return 1
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	failed := 0
	for n := 1; ; n++ {
		reloaded, err := h.Pass()
		if err != nil {
			failed++
			// One line per pass on stdout, so a driver can wait for "pass N" deterministically.
			fmt.Printf("kovn-harness: pass %d failed: %v\n", n, err)
		} else {
			fmt.Printf("kovn-harness: pass %d ok (protocol %s, cluster reloaded: %t)\n", n, h.Protocol(), reloaded)
		}
		if passes > 0 && n >= passes {
			break
		}
		select {
		case <-stop:
			return exitCode(failed)
		case <-ticker.C:
		}
	}
	return exitCode(failed)
}

func exitCode(failed int) int {
	if failed > 0 {
		return 1
	}
	return 0
}
