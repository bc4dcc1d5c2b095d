package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// procSample is what /proc says about a process at one moment.
type procSample struct {
	RSSKB int64 // VmRSS
	HWMKB int64 // VmHWM, the peak of VmRSS
	// CPUTicks is utime+stime in clock ticks (/proc/PID/stat).
	CPUTicks int64
	// SchedNs sums the on-CPU time of the process's threads from
	// /proc/PID/task/*/schedstat, in nanoseconds: the same time as
	// CPUTicks at a finer resolution (0 where the kernel has no
	// schedstat). A thread that exited is no longer counted.
	SchedNs int64
}

// clockTick is the length of a /proc clock tick in seconds.
var clockTick = 1 / float64(clockTicksPerSecond())

// clockTicksPerSecond reads AT_CLKTCK from the auxiliary vector (what
// sysconf(_SC_CLK_TCK) returns); 100 when it cannot be read.
func clockTicksPerSecond() uint64 {
	const atClkTck = 17
	data, err := os.ReadFile("/proc/self/auxv")
	if err != nil {
		return 100
	}
	for len(data) >= 16 {
		k, v := binary.NativeEndian.Uint64(data), binary.NativeEndian.Uint64(data[8:])
		if k == atClkTck && v > 0 {
			return v
		}
		data = data[16:]
	}
	return 100
}

func readProc(pid int) (procSample, error) {
	var s procSample
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			s.RSSKB, _ = strconv.ParseInt(f[1], 10, 64)
		case "VmHWM:":
			s.HWMKB, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name may hold spaces and parentheses: fields are
	// counted after its closing parenthesis, where field 3 (state) is
	// rest[0]; utime (14) and stime (15) are rest[11] and rest[12].
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	rest := strings.Fields(string(stat[i+1:]))
	if len(rest) < 13 {
		return s, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	ut, err1 := strconv.ParseInt(rest[11], 10, 64)
	st, err2 := strconv.ParseInt(rest[12], 10, 64)
	if err1 != nil || err2 != nil {
		return s, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	s.CPUTicks = ut + st
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	for _, t := range tasks {
		data, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		if f := strings.Fields(string(data)); len(f) > 0 {
			n, _ := strconv.ParseInt(f[0], 10, 64)
			s.SchedNs += n
		}
	}
	return s, nil
}

// resetPeak makes VmHWM start again from the current VmRSS, so that the
// next reading is the peak of what follows.
func resetPeak(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// cpuSeconds is the CPU time between two samples, from utime+stime.
func cpuSeconds(a, b procSample) float64 {
	return math.Round(float64(b.CPUTicks-a.CPUTicks)*clockTick*1e3) / 1e3
}

// schedSeconds is the CPU time between two samples, from schedstat.
func schedSeconds(a, b procSample) float64 { return float64(b.SchedNs-a.SchedNs) / 1e9 }
